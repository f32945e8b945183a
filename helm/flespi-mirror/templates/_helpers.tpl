{{/*
Name of the chart, or nameOverride.
*/}}
{{- define "flespi-mirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name of the release's objects: "<release>-<name>", or just the release name when it
already contains the chart name. Truncated to 63 characters (DNS label).
*/}}
{{- define "flespi-mirror.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Name of the migration Job and of its hook Secret; leaves room for the suffix in 63 characters.
*/}}
{{- define "flespi-mirror.migrationName" -}}
{{- printf "%s-migrate" (include "flespi-mirror.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{/*
Chart label value: "<name>-<version>".
*/}}
{{- define "flespi-mirror.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels shared by every object of the release, without the component.
*/}}
{{- define "flespi-mirror.baseLabels" -}}
helm.sh/chart: {{ include "flespi-mirror.chart" . }}
app.kubernetes.io/name: {{ include "flespi-mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flespi-mirror
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Labels of the daemon and of the objects that serve it.
*/}}
{{- define "flespi-mirror.labels" -}}
{{ include "flespi-mirror.baseLabels" . }}
app.kubernetes.io/component: mirror
{{- end -}}

{{/*
Labels of the migration Job, its pod and its hook Secret. The component differs from the
daemon's, so the Service and the PodDisruptionBudget never select migration pods.
*/}}
{{- define "flespi-mirror.migrationLabels" -}}
{{ include "flespi-mirror.baseLabels" . }}
app.kubernetes.io/component: migration
{{- end -}}

{{/*
Selector of the daemon pods (Deployment, Service, PodDisruptionBudget).
*/}}
{{- define "flespi-mirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flespi-mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mirror
{{- end -}}

{{/*
Name of the daemon's ServiceAccount.
*/}}
{{- define "flespi-mirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "flespi-mirror.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
ServiceAccount of the migration pod. A pre-install hook runs before the chart's own
ServiceAccount exists, so it can only use an account that is already there.
*/}}
{{- define "flespi-mirror.migrationServiceAccountName" -}}
{{- if .Values.migration.serviceAccountName -}}
{{- .Values.migration.serviceAccountName -}}
{{- else if not .Values.serviceAccount.create -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/*
Secret the daemon reads the flespi token and the database URL from.
*/}}
{{- define "flespi-mirror.secretName" -}}
{{- default (include "flespi-mirror.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/*
Secret the migration Job reads the database URL from: existingSecret, or the hook Secret the
chart creates for the Job (the release's own Secret does not exist yet at pre-install).
*/}}
{{- define "flespi-mirror.migrationSecretName" -}}
{{- default (include "flespi-mirror.migrationName" .) .Values.existingSecret -}}
{{- end -}}

{{/*
Image reference: repository, then @digest when set, else :tag (default: the appVersion).
*/}}
{{- define "flespi-mirror.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Environment of the database connection, shared by the daemon and the migration Job.
Argument: a dict with "ctx" (the root context) and "secretName".
*/}}
{{- define "flespi-mirror.databaseEnv" -}}
- name: MIRROR_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .ctx.Values.secretKeys.databaseUrl }}
- name: MIRROR_SCHEMA
  value: {{ .ctx.Values.config.schema | quote }}
- name: MIRROR_LOG_FORMAT
  value: {{ .ctx.Values.config.logFormat | quote }}
{{- with .ctx.Values.database.tls }}
{{- if .caSecret }}
- name: PGSSLROOTCERT
  value: {{ printf "/etc/flespi-mirror/postgres-ca/%s" .caKey | quote }}
- name: PGSSLMODE
  value: {{ .sslmode | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The database CA from database.tls.caSecret: a volume and its mount, for the daemon's pod and
the migration Job's (empty without caSecret).
*/}}
{{- define "flespi-mirror.databaseCaVolume" -}}
{{- with .Values.database.tls.caSecret }}
- name: postgres-ca
  secret:
    secretName: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "flespi-mirror.databaseCaMount" -}}
{{- if .Values.database.tls.caSecret }}
- name: postgres-ca
  mountPath: /etc/flespi-mirror/postgres-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/*
Label matchers that select the mirror's series in Prometheus: the ServiceMonitor's job label
is the Service name.
*/}}
{{- define "flespi-mirror.alertSelector" -}}
job="{{ include "flespi-mirror.fullname" . }}",namespace="{{ .Release.Namespace }}"
{{- end -}}

{{/*
Refuse settings that cannot work, with a message that says what to change.
*/}}
{{- define "flespi-mirror.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.config.shareGroup) -}}
{{- fail "replicaCount > 1 needs config.shareGroup: without an MQTT 5 shared subscription every pod would receive (and write) every message" -}}
{{- end -}}
{{- if and (gt (int .Values.replicaCount) 1) .Values.config.clientId -}}
{{- fail "config.clientId must stay empty when replicaCount > 1: pods sharing one client id keep disconnecting each other; each pod gets its own id from its pod name" -}}
{{- end -}}
{{- end -}}
