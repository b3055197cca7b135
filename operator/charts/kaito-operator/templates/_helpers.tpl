{{- define "kaito-operator.name" -}}
{{- printf "%s-kaito-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kaito-operator.labels" -}}
app.kubernetes.io/name: kaito-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kaito-operator.selector" -}}
app.kubernetes.io/name: kaito-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
