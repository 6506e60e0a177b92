{{/* Names, labels and pieces shared by the templates. */}}

{{- define "cohort.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or <release> when it already contains the chart name; at most 45 characters so
     that "-worker-headless" still fits the 63 a DNS label allows. */}}
{{- define "cohort.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cohort.routerName" -}}{{ include "cohort.fullname" . }}-router{{- end -}}
{{- define "cohort.workerName" -}}{{ include "cohort.fullname" . }}-worker{{- end -}}
{{- define "cohort.workerHeadlessName" -}}{{ include "cohort.fullname" . }}-worker-headless{{- end -}}
{{- define "cohort.dashboardName" -}}{{ include "cohort.fullname" . }}-dashboard{{- end -}}
{{- define "cohort.modelClaimName" -}}
{{- default (printf "%s-models" (include "cohort.fullname" .)) .Values.model.pvc.existingClaim -}}
{{- end -}}

{{/* The name:port the router resolves to every ready worker pod (--workers-dns). */}}
{{- define "cohort.workersDns" -}}
{{- printf "%s.%s.svc.%s:%d" (include "cohort.workerHeadlessName" .) .Release.Namespace .Values.clusterDomain (.Values.worker.ports.grpc | int) -}}
{{- end -}}

{{/* The checkpoint folder inside the worker container (--model). */}}
{{- define "cohort.modelDir" -}}
{{- if .Values.model.path -}}
{{- printf "%s/%s" (.Values.model.mountPath | trimSuffix "/") (.Values.model.path | trimPrefix "/") -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "cohort.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cohort.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cohort.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cohort.labels" -}}
helm.sh/chart: {{ include "cohort.chart" . }}
{{ include "cohort.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cohort
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "router"). */}}
{{- define "cohort.componentSelectorLabels" -}}
{{ include "cohort.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cohort.componentLabels" -}}
{{ include "cohort.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* image: call with the component's image values and the root context. */}}
{{- define "cohort.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- printf "%s:%s" (required "an image repository is required" .image.repository) $tag -}}
{{- end -}}

{{/* Prometheus annotation-based discovery; call with (dict "root" $ "port" <metrics port>). */}}
{{- define "cohort.scrapeAnnotations" -}}
{{- if .root.Values.metrics.scrapeAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | int | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{/* A gRPC probe on the standard health service: call with (dict "port" <port> "probe" <values>). */}}
{{- define "cohort.grpcProbe" -}}
grpc:
  port: {{ .port | int }}
{{- with .probe }}
{{ toYaml . }}
{{- end }}
{{- end -}}
