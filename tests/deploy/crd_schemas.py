"""JSON schemas of the custom resources k8s/ uses, written from the upstream CRDs.

kubernetes-validate knows no CRD, and a cluster with the CRDs installed would
*prune* an unknown field silently (a misspelt ``excludeUnacknowledged`` simply
does nothing). These schemas reject it: every object is closed
(``additionalProperties: false``) with the field names of the CRD versions named
below, read from the CRDs' openAPIV3Schema; types, enums and patterns as there.
Fields the manifests do not use are listed with their type only.

- KEDA v2.20.2: config/crd/bases/keda.sh_scaledjobs.yaml,
  keda.sh_triggerauthentications.yaml (keda.sh/v1alpha1). A ScaledJob's
  ``jobTargetRef`` is a batch/v1 JobSpec: tests/deploy validates it as a Job with
  kubernetes-validate (the CRD inlines that schema).
- prometheus-operator v0.93.0: example/prometheus-operator-crd/
  monitoring.coreos.com_{servicemonitors,podmonitors,prometheusrules}.yaml
  (monitoring.coreos.com/v1).
- PodDisruptionBudget and NetworkPolicy are core objects: kubernetes-validate
  --strict checks them (unknown fields rejected) against the Kubernetes schemas.
"""

from __future__ import annotations

KEDA_VERSION = "v2.20.2"
PROMETHEUS_OPERATOR_VERSION = "v0.93.0"

#: Prometheus duration, as the prometheus-operator CRDs spell it.
DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)

_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}
_ARR = {"type": "array"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    """Top level of a namespaced custom resource."""
    return _closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _closed(
                {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                    "namespace": _STR,
                    "labels": _STR_MAP,
                    "annotations": _STR_MAP,
                },
                ("name",),
            ),
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


_LABEL_SELECTOR = _closed(
    {
        "matchLabels": _STR_MAP,
        "matchExpressions": {
            "type": "array",
            "items": _closed(
                {"key": _STR, "operator": _STR, "values": {"type": "array", "items": _STR}},
                ("key", "operator"),
            ),
        },
    }
)

# ----------------------------------------------------------------------------- KEDA

_KEDA_TRIGGER = _closed(
    {
        "type": _STR,
        "name": _STR,
        "metricType": _STR,
        "useCachedMetrics": _BOOL,
        "metadata": _STR_MAP,
        "authenticationRef": _closed(
            {
                "name": _STR,
                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
            },
            ("name",),
        ),
    },
    ("type", "metadata"),
)

SCALED_JOB = _resource(
    "keda.sh/v1alpha1",
    "ScaledJob",
    _closed(
        {
            "envSourceContainerName": _STR,
            "failedJobsHistoryLimit": {"type": "integer", "minimum": 0},
            "successfulJobsHistoryLimit": {"type": "integer", "minimum": 0},
            "jobTargetRef": {"type": "object", "required": ["template"]},  # a JobSpec, see above
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "rollout": _closed(
                {
                    "propagationPolicy": {"enum": ["foreground", "background"]},
                    "strategy": {"enum": ["gradual", "immediate"]},
                }
            ),
            "rolloutStrategy": {"enum": ["gradual", "immediate"]},
            "scalingStrategy": _closed(
                {
                    "customScalingQueueLengthDeduction": _INT,
                    "customScalingRunningJobPercentage": _STR,
                    "multipleScalersCalculation": {"enum": ["min", "avg", "sum", "max"]},
                    "pendingPodConditions": {"type": "array", "items": _STR},
                    "strategy": {"enum": ["default", "custom", "accurate", "eager"]},
                }
            ),
            "triggers": {"type": "array", "minItems": 1, "items": _KEDA_TRIGGER},
        },
        ("jobTargetRef", "triggers"),
    ),
)

TRIGGER_AUTHENTICATION = _resource(
    "keda.sh/v1alpha1",
    "TriggerAuthentication",
    _closed(
        {
            "secretTargetRef": {
                "type": "array",
                "items": _closed({"parameter": _STR, "name": _STR, "key": _STR},
                                 ("parameter", "name", "key")),
            },
            # The other ways KEDA reads credentials (unused here).
            "awsSecretManager": _OBJ,
            "azureKeyVault": _OBJ,
            "boundServiceAccountToken": _ARR,
            "configMapTargetRef": _ARR,
            "env": _ARR,
            "filePath": _STR,
            "gcpSecretManager": _OBJ,
            "hashiCorpVault": _OBJ,
            "oauth2": _OBJ,
            "podIdentity": _OBJ,
        }
    ),
)

# ------------------------------------------------------------------ prometheus-operator

_RELABEL = _closed(
    {
        "action": {
            "enum": [
                "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                "dropequal", "DropEqual",
            ]
        },
        "modulus": {"type": "integer", "minimum": 0},
        "regex": _STR,
        "replacement": _STR,
        "separator": _STR,
        "sourceLabels": {"type": "array", "items": _STR},
        "targetLabel": _STR,
    }
)

#: Fields of a ServiceMonitor endpoint / PodMonitor podMetricsEndpoint, both.
_ENDPOINT_COMMON = {
    "authorization": _OBJ,
    "basicAuth": _OBJ,
    "bearerTokenSecret": _OBJ,
    "enableHttp2": _BOOL,
    "filterRunning": _BOOL,
    "followRedirects": _BOOL,
    "honorLabels": _BOOL,
    "honorTimestamps": _BOOL,
    "interval": {"type": "string", "pattern": DURATION},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
    "noProxy": _STR,
    "oauth2": _OBJ,
    "params": _OBJ,
    "path": _STR,
    "port": _STR,
    "proxyConnectHeader": _OBJ,
    "proxyFromEnvironment": _BOOL,
    "proxyUrl": {"type": "string", "pattern": r"^(http|https|socks5)://.+$"},
    "relabelings": {"type": "array", "items": _RELABEL},
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "scrapeTimeout": {"type": "string", "pattern": DURATION},
    "targetPort": {"type": ["integer", "string"]},
    "tlsConfig": _OBJ,
    "trackTimestampsStaleness": _BOOL,
}

#: spec fields ServiceMonitor and PodMonitor share.
_MONITOR_COMMON = {
    "attachMetadata": _OBJ,
    "bodySizeLimit": _STR,
    "convertClassicHistogramsToNHCB": _BOOL,
    "fallbackScrapeProtocol": _STR,
    "jobLabel": _STR,
    "keepDroppedTargets": {"type": "integer", "minimum": 0},
    "labelLimit": {"type": "integer", "minimum": 0},
    "labelNameLengthLimit": {"type": "integer", "minimum": 0},
    "labelValueLengthLimit": {"type": "integer", "minimum": 0},
    "namespaceSelector": _closed({"any": _BOOL, "matchNames": {"type": "array", "items": _STR}}),
    "nativeHistogramBucketLimit": {"type": "integer", "minimum": 0},
    "nativeHistogramMinBucketFactor": {"type": ["integer", "string"]},
    "podTargetLabels": {"type": "array", "items": _STR},
    "sampleLimit": {"type": "integer", "minimum": 0},
    "scrapeClass": _STR,
    "scrapeClassicHistograms": _BOOL,
    "scrapeNativeHistograms": _BOOL,
    "scrapeProtocols": {"type": "array", "items": _STR},
    "selector": _LABEL_SELECTOR,
    "selectorMechanism": {"enum": ["RelabelConfig", "RoleSelector"]},
    "targetLimit": {"type": "integer", "minimum": 0},
}

SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _closed(
        {
            **_MONITOR_COMMON,
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": _closed({**_ENDPOINT_COMMON, "bearerTokenFile": _STR}),
            },
            "serviceDiscoveryRole": {"enum": ["Endpoints", "EndpointSlice"]},
            "targetLabels": {"type": "array", "items": _STR},
        },
        ("endpoints", "selector"),
    ),
)

POD_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "PodMonitor",
    _closed(
        {
            **_MONITOR_COMMON,
            "podMetricsEndpoints": {
                "type": "array",
                "minItems": 1,
                "items": _closed({**_ENDPOINT_COMMON, "portNumber": {"type": "integer", "minimum": 1}}),
            },
        },
        ("selector",),
    ),
)

PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    _closed(
        {
            "groups": {
                "type": "array",
                "items": _closed(
                    {
                        "name": _STR,
                        "interval": {"type": "string", "pattern": DURATION},
                        "labels": _STR_MAP,
                        "limit": _INT,
                        "partial_response_strategy": _STR,
                        "query_offset": {"type": "string", "pattern": DURATION},
                        "rules": {
                            "type": "array",
                            "items": _closed(
                                {
                                    "alert": _STR,
                                    "record": _STR,
                                    "expr": {"type": ["string", "integer"]},
                                    "for": {"type": "string", "pattern": DURATION},
                                    "keep_firing_for": {"type": "string", "pattern": DURATION},
                                    "labels": _STR_MAP,
                                    "annotations": _STR_MAP,
                                },
                                ("expr",),
                            ),
                        },
                    },
                    ("name",),
                ),
            }
        }
    ),
)

BY_KIND = {
    "ScaledJob": SCALED_JOB,
    "TriggerAuthentication": TRIGGER_AUTHENTICATION,
    "ServiceMonitor": SERVICE_MONITOR,
    "PodMonitor": POD_MONITOR,
    "PrometheusRule": PROMETHEUS_RULE,
}
