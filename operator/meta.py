"""Names the operator's resources share (API group and version), used by every operator module."""

GROUP = "kaito.sh"
VERSION = "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"
