"""`kaito-operator run` for the Azure tests: the same command, with a static token instead of
azure-identity's DefaultAzureCredential (the ARM fake accepts any bearer token).
Usage: python tests/azure_operator.py run --provisioner azure ..."""

import sys
import time

from azure.core.credentials import AccessToken, AccessTokenInfo
from kaito.operator.cli import parser
from kaito.operator.manager import run
from kaito.presets.logs import setup_logging


class StaticToken:
    def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken("fake-token", int(time.time()) + 3600)

    def get_token_info(self, *scopes, options=None) -> AccessTokenInfo:
        return AccessTokenInfo("fake-token", int(time.time()) + 3600)


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(parser().parse_args(sys.argv[1:]), azure_credential=StaticToken()))
