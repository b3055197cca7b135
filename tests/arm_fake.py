"""An HTTP fake of Azure Resource Manager on 127.0.0.1, for the Azure provisioner's tests.

The real Azure SDK clients (azure-mgmt-containerservice, azure-mgmt-compute) talk to it with their
real long-running-operation pollers. Resources are kept by their ARM id, whatever their type:

- PUT creates or updates (201 on create, 200 on update) and answers `provisioningState: Creating`
  with an `Azure-AsyncOperation` header; the operation reports `InProgress` for `polls` polls and
  then `Succeeded` (the resource's provisioningState follows), or `Failed` with an error;
- GET of a resource (404 `ResourceNotFound` when absent) and of a collection (`{"value": [...]}`);
- DELETE answers 202 with an `Azure-AsyncOperation` header; the resource goes when the operation
  succeeds (204 when it is already absent);
- `GET /subscriptions/S/providers/Microsoft.Compute/skus` lists resource SKUs (with GPU
  capabilities and restrictions), filtered by `location eq '...'`;
- `quota` (VM size -> family) makes a PUT of that size fail at once with 409 `QuotaExceeded`, as
  ARM's preflight check does; `late_quota` accepts the PUT (201) and ends its operation `Failed` with
  `QuotaExceeded`, the resource left in provisioningState `Failed`, as a pool whose VMs could not be
  allocated is;
- faults: `poll_errors` (the next N polls of an operation answered 500), `throttle` (the next N
  requests answered 429 with `Retry-After: retry_after`); `faults` counts what was answered so.

Not covered: authentication (any bearer token is accepted), `api-version` checks, ETags,
paging (`nextLink`), the resources' own validation rules.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from typing import Any

from aiohttp import web

GPU_SKUS = [  # name, GPUs, vCPUs, memory GiB
    ("Standard_NC24ads_A100_v4", 1, 24, 220),
    ("Standard_NC48ads_A100_v4", 2, 48, 440),
    ("Standard_NC6s_v3", 1, 6, 112),
    ("Standard_NC4as_T4_v3", 1, 4, 28),
    ("Standard_NC40ads_H100_v5", 1, 40, 320),
    ("Standard_D4s_v5", 0, 4, 16),
]


def sku(name: str, gpus: int, vcpus: int, mem: int, location: str, restricted: bool = False) -> dict[str, Any]:
    caps = [{"name": "vCPUs", "value": str(vcpus)}, {"name": "MemoryGB", "value": str(mem)}]
    if gpus:
        caps.append({"name": "GPUs", "value": str(gpus)})
    return {"resourceType": "virtualMachines", "name": name, "tier": "Standard", "size": name.split("_", 1)[1],
            "family": f"standard{name.split('_')[1]}Family", "locations": [location],
            "locationInfo": [{"location": location, "zones": ["1", "2", "3"]}], "capabilities": caps,
            "restrictions": [{"type": "Location", "values": [location], "reasonCode": "NotAvailableForSubscription",
                              "restrictionInfo": {"locations": [location]}}] if restricted else []}


class ArmFake:
    def __init__(self, location: str = "eastus") -> None:
        self.location = location
        self.resources: dict[str, dict] = {}  # lower-case ARM id -> resource
        self.operations: dict[str, dict] = {}
        self.skus = [sku(n, g, c, m, location) for n, g, c, m in GPU_SKUS]
        self.quota: dict[str, str] = {}  # vmSize -> quota family exceeded (at the PUT)
        self.late_quota: dict[str, str] = {}  # vmSize -> quota family exceeded (when the operation ends)
        self.poll_errors = 0  # the next polls answered 500
        self.throttle = 0  # the next requests answered 429
        self.retry_after = 1
        self.faults: Counter[str] = Counter()  # "500 poll", "429": times answered so
        self.polls = 1  # InProgress answers before an operation ends
        self.puts: list[str] = []  # ids PUT, in order (to count creations)
        self.deletes: list[str] = []
        self.url = ""

    def restrict(self, name: str) -> None:
        for s in self.skus:
            if s["name"] == name:
                s["restrictions"] = sku(name, 1, 1, 1, self.location, restricted=True)["restrictions"]

    def _op(self, request: web.Request, on_done, error: dict | None = None) -> str:
        op_id = uuid.uuid4().hex
        self.operations[op_id] = {"left": self.polls, "done": on_done, "error": error}
        return f"{self.url}/subscriptions/x/providers/Microsoft.Fake/locations/{self.location}/operations/{op_id}" \
               f"?api-version={request.query.get('api-version', '')}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        key = path.lower()
        if self.throttle > 0:
            self.throttle -= 1
            self.faults["429"] += 1
            return self._error(429, "TooManyRequests", "The request is being throttled.",
                               headers={"Retry-After": str(self.retry_after)})
        if "/operations/" in key:
            op = self.operations.get(path.rsplit("/", 1)[-1])
            if op is None:
                return self._error(404, "NotFound", "no such operation")
            if self.poll_errors > 0:
                self.poll_errors -= 1
                self.faults["500 poll"] += 1
                return self._error(500, "InternalServerError", "An internal error occurred; please retry.")
            if op["left"] > 0:
                op["left"] -= 1
                return web.json_response({"status": "InProgress"})
            if op["done"]:
                op["done"]()
                op["done"] = None
            if op["error"]:
                return web.json_response({"status": "Failed", "error": op["error"]})
            return web.json_response({"status": "Succeeded"})
        if key.endswith("/providers/microsoft.compute/skus"):
            flt = request.query.get("$filter", "")
            loc = flt.split("'")[1] if "'" in flt else None
            return web.json_response({"value": [s for s in self.skus if loc is None or loc in s["locations"]]})
        if request.method == "PUT":
            body = await request.json()
            props = body.setdefault("properties", {})
            size = props.get("vmSize") or (body.get("sku") or {}).get("name")
            if size in self.quota:
                return self._error(409, "QuotaExceeded", self._quota_message(self.quota[size]))
            late = {"code": "QuotaExceeded", "message": self._quota_message(self.late_quota[size])} \
                if size in self.late_quota else None
            existed = key in self.resources
            parts = path.split("/")
            resource = {**body, "id": path, "name": parts[-1], "type": "/".join([parts[6], *parts[7::2]])}
            resource["properties"]["provisioningState"] = "Updating" if existed else "Creating"
            self.resources[key] = resource
            self.puts.append(key)

            def done() -> None:
                if key in self.resources:
                    self.resources[key]["properties"]["provisioningState"] = "Failed" if late else "Succeeded"

            headers = {"Azure-AsyncOperation": self._op(request, done, late)}
            return web.json_response(resource, status=200 if existed else 201, headers=headers)
        if request.method == "DELETE":
            if key not in self.resources:
                return web.Response(status=204)
            self.resources[key]["properties"]["provisioningState"] = "Deleting"
            self.deletes.append(key)
            headers = {"Azure-AsyncOperation": self._op(request, lambda: self.resources.pop(key, None)),
                       "Location": f"{self.url}{path}"}
            return web.Response(status=202, headers=headers)
        if request.method == "GET":
            if key in self.resources:
                return web.json_response(self.resources[key])
            children = [r for k, r in self.resources.items() if k.rsplit("/", 1)[0] == key]
            if children or self._is_collection(key):
                return web.json_response({"value": children})
            return self._error(404, "ResourceNotFound", f"The Resource '{path}' was not found.")
        return self._error(405, "MethodNotAllowed", request.method)

    @staticmethod
    def _is_collection(key: str) -> bool:
        return key.endswith(("/agentpools", "/virtualmachinescalesets"))

    def _quota_message(self, family: str) -> str:
        return (f"Operation could not be completed as it results in exceeding approved {family} Cores quota. "
                f"Location: {self.location}, Current Limit: 0, Current Usage: 0, Additional Required: 24")

    @staticmethod
    def _error(code: int, err: str, message: str, headers: dict | None = None) -> web.Response:
        return web.json_response({"error": {"code": err, "message": message}}, status=code, headers=headers)

    def start(self) -> ArmFake:
        ready = threading.Event()

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self.handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._runner.cleanup())

        self._thread = threading.Thread(target=serve, name="arm-fake", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def pools(self) -> list[dict]:
        # a copy taken in one step: the server thread adds and removes resources meanwhile
        return [r for k, r in list(self.resources.items()) if "/agentpools/" in k]
