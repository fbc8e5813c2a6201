"""A loopback CryoSPARC v5 API for tests: serves an openapi.json and the ~20 operations an External job uses, so
the real, unmodified cryosparc-tools client runs end to end (connect, create, connect inputs, load, save outputs,
event logs, plots, failure). State lives in memory; a project directory on disk holds the stacks and .cs files.

Not CryoSPARC: the operation names (``summary``) and the model shapes follow cryosparc-tools 5.0; the URL paths
are this server's own (the client reads them from openapi.json and hard-codes none).
"""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from cryosparc.dataset import Dataset

NOW = "2026-01-01T00:00:00Z"
DATASET_MIME = "application/x-cryosparc-dataset"


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


# summary: (method, path, query params, body kind, response schema or 'dataset')
ROUTES = {
    "login": ("post", "/login", [], "form", ref("Token")),
    "users.me": ("get", "/users/me", [], None, ref("User")),
    "config.get_version": ("get", "/config/version", [], None, {"type": "string"}),
    "projects.find_one": ("get", "/projects/{project_uid}", [], None, ref("Project")),
    "projects.get_directory": ("get", "/projects/{project_uid}/directory", [], None, {"type": "string"}),
    "jobs.get_directory": ("get", "/projects/{project_uid}/jobs/{job_uid}/directory", [], None, {"type": "string"}),
    "workspaces.find_one": ("get", "/projects/{project_uid}/workspaces/{workspace_uid}", [], None, ref("Workspace")),
    "jobs.find_one": ("get", "/projects/{project_uid}/jobs/{job_uid}", [], None, ref("Job")),
    "jobs.create": ("post", "/projects/{project_uid}/workspaces/{workspace_uid}/jobs",
                    ["type", "title", "description"], "json:Params", ref("Job")),
    "jobs.add_external_input": ("post", "/projects/{project_uid}/jobs/{job_uid}/inputs/{input_name}", [],
                                "json:Body", ref("Job")),
    "jobs.add_external_output": ("post", "/projects/{project_uid}/jobs/{job_uid}/outputs/{output_name}", [],
                                 "json:Body", ref("Job")),
    "jobs.connect": ("post", "/projects/{project_uid}/jobs/{job_uid}/connect/{input_name}",
                     ["source_job_uid", "source_output_name"], None, ref("Job")),
    "jobs.load_input": ("get", "/projects/{project_uid}/jobs/{job_uid}/inputs/{input_name}/dataset", ["slots"], None,
                        "dataset"),
    "jobs.get_output_fields": ("post", "/projects/{project_uid}/jobs/{job_uid}/outputs/{output_name}/fields", [],
                               "json:Dtype Params", {"type": "array", "items": {}}),
    "jobs.save_output": ("post", "/projects/{project_uid}/jobs/{job_uid}/outputs/{output_name}/dataset", ["version"],
                         "dataset", ref("Job")),
    "jobs.mark_running": ("post", "/projects/{project_uid}/jobs/{job_uid}/running", ["status"], None, ref("Job")),
    "jobs.mark_completed": ("post", "/projects/{project_uid}/jobs/{job_uid}/completed", [], None, ref("Job")),
    "jobs.mark_failed": ("post", "/projects/{project_uid}/jobs/{job_uid}/failed", ["error"], None, ref("Job")),
    "jobs.add_event_log": ("post", "/projects/{project_uid}/jobs/{job_uid}/events", ["type"], "json:Text",
                           ref("TextEvent")),
    "jobs.update_event_log": ("put", "/projects/{project_uid}/jobs/{job_uid}/events/{event_id}", ["type"], "json:Text",
                              ref("TextEvent")),
    "jobs.add_image_log": ("post", "/projects/{project_uid}/jobs/{job_uid}/image_events", ["text", "flags"],
                           "json:Images", ref("ImageEvent")),
    "assets.upload": ("post", "/projects/{project_uid}/jobs/{job_uid}/assets", ["filename", "format"], "stream",
                      ref("GridFSAsset")),
    "projects.upload_file": ("post", "/projects/{project_uid}/files", ["path", "overwrite"], "stream", None),
}


def openapi() -> dict:
    paths: dict = {}
    for summary, (method, path, query, body, response) in ROUTES.items():
        op = {"summary": summary, "parameters": [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in re.findall(r"{(\w+)}", path)]
            + [{"name": q, "in": "query", "required": False, "schema": {}} for q in query]}
        if body == "form":
            op["requestBody"] = {"content": {"application/x-www-form-urlencoded": {"schema": {}}}, "required": True}
        elif body in ("dataset", "stream"):
            mime = DATASET_MIME if body == "dataset" else "application/octet-stream"
            op["requestBody"] = {"content": {mime: {"schema": {"title": "Stream", "type": "string", "format": "binary"}}},
                                 "required": True}
        elif body:
            op["requestBody"] = {"content": {"application/json": {"schema": {"title": body[5:]}}}, "required": False}
        if response == "dataset":
            op["responses"] = {"200": {"content": {DATASET_MIME: {"schema": {}}}}}
        elif response is None:
            op["responses"] = {"200": {"description": "ok"}}
        else:
            op["responses"] = {"200": {"content": {"application/json": {"schema": response}}},
                               "422": {"content": {"application/json": {"schema": {}}}}}
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.1.0", "info": {"title": "loopback CryoSPARC", "version": "v5.0.0"}, "paths": paths,
            "components": {"schemas": {}}}


class State:
    """Projects, workspaces, jobs (with their output datasets on disk), events; and fault injection."""

    def __init__(self, project_dir: Path):
        self.project_dir = Path(project_dir)
        self.jobs: dict[str, dict] = {}
        self.datasets: dict[tuple[str, str], Path] = {}
        self.events: list[dict] = []
        self.images: list[dict] = []
        self.fail_next: dict[str, int] = {}  # summary -> HTTP status to answer once
        self.calls: list[str] = []
        self.counter = 1
        self.lock = threading.Lock()

    def add_source_job(self, uid: str, output: str, dataset_path: Path, type_: str = "particle") -> None:
        """A finished job (e.g. a refinement) whose output ``output`` is the dataset at ``dataset_path``."""
        ds = Dataset.load(str(dataset_path))
        slots = sorted({f.split("/")[0] for f in ds.fields() if "/" in f})
        self.jobs[uid] = self._job(uid, "homo_refine_new", "completed")
        self.jobs[uid]["spec"]["outputs"][output] = {
            "type": type_, "title": output, "results": [{"name": s, "dtype": s} for s in slots]}
        self.datasets[(uid, output)] = Path(dataset_path)
        self.counter = max(self.counter, int(uid[1:]) + 1)

    def _job(self, uid, type_, status="building", title=""):
        return {"uid": uid, "project_uid": "P1", "workspace_uids": ["W1"], "job_dir": uid, "title": title,
                "job_dir_size_last_updated": NOW, "uid_num": int(uid[1:]), "project_uid_num": 1, "status": status,
                "status_num": 0, "build_errors": [], "created_at": NOW, "updated_at": NOW,
                "spec": {"type": type_, "ui_tile_width": 1, "ui_tile_height": 1, "resource_spec": {},
                         "inputs": {}, "outputs": {}, "params": {}}}


class Handler(BaseHTTPRequestHandler):
    state: State
    routes: list

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status, body=b"", ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status=200):
        self._send(status, json.dumps(obj).encode())

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = io.BytesIO()
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out.getvalue()
                out.write(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method):
        url = urlparse(self.path)
        path = url.path.removeprefix("/api/cmd")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if path == "/openapi.json":
            return self._json(openapi())
        for summary, (m, template, _, _, _) in ROUTES.items():
            pattern = "^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", template) + "$"
            match = re.match(pattern, path)
            if m == method and match:
                st = self.state
                st.calls.append(summary)
                if summary != "login" and not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self._json({"detail": "not authenticated"}, 401)
                if summary in st.fail_next:
                    status = st.fail_next.pop(summary)
                    if status == 0:  # a dropped connection: close the socket without an answer
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return None
                    return self._json({"detail": "injected server error"}, status)
                args = {k: unquote(v) for k, v in match.groupdict().items()}
                body = self._body()
                with st.lock:
                    return getattr(self, "op_" + summary.replace(".", "_"))(args, query, body)
        return self._json({"detail": f"no route {method} {path}"}, 404)

    def do_GET(self):
        self._dispatch("get")

    def do_POST(self):
        self._dispatch("post")

    def do_PUT(self):
        self._dispatch("put")

    # ---- operations
    def op_login(self, a, q, body):
        self._json({"access_token": "loopback-token", "token_type": "bearer"})

    def op_users_me(self, a, q, body):
        self._json({"_id": "u1", "name": "tester", "first_name": "Test", "last_name": "User",
                    "emails": [{"address": "test@example.org", "verified": True}], "created_at": NOW})

    def op_config_get_version(self, a, q, body):
        self._json("v5.0.0")

    def op_projects_find_one(self, a, q, body):
        self._json({"uid": a["project_uid"], "project_dir": str(self.state.project_dir), "owner_user_id": "u1",
                    "title": "loopback", "size_last_updated": NOW, "uid_num": 1, "created_at": NOW})

    def op_projects_get_directory(self, a, q, body):
        self._json(str(self.state.project_dir))

    def op_jobs_get_directory(self, a, q, body):
        self._json(str(self.state.project_dir / a["job_uid"]))

    def op_workspaces_find_one(self, a, q, body):
        self._json({"uid": a["workspace_uid"], "project_uid": a["project_uid"], "workspace_type": "base",
                    "uid_num": 1, "project_uid_num": 1, "created_at": NOW})

    def _job_or_404(self, uid):
        job = self.state.jobs.get(uid)
        if job is None:
            self._json({"detail": f"job {uid} not found"}, 404)
        return job

    def op_jobs_find_one(self, a, q, body):
        job = self._job_or_404(a["job_uid"])
        if job is not None:
            self._json(job)

    def op_jobs_create(self, a, q, body):
        st = self.state
        uid = f"J{st.counter}"
        st.counter += 1
        st.jobs[uid] = st._job(uid, q.get("type", "snowflake"), title=q.get("title", ""))
        (st.project_dir / uid).mkdir(parents=True, exist_ok=True)
        self._json(st.jobs[uid])

    def op_jobs_add_external_input(self, a, q, body):
        job = self.state.jobs[a["job_uid"]]
        spec = json.loads(body)
        job["spec"]["inputs"][a["input_name"]] = {"type": spec["type"], "title": spec["title"],
                                                  "slots": spec.get("slots", []), "count_min": spec.get("count_min", 0),
                                                  "count_max": spec.get("count_max"), "connections": []}
        self._json(job)

    def op_jobs_add_external_output(self, a, q, body):
        job = self.state.jobs[a["job_uid"]]
        spec = json.loads(body)
        job["spec"]["outputs"][a["output_name"]] = {"type": spec["type"], "title": spec["title"],
                                                    "results": [{"name": s["name"], "dtype": s["dtype"]} for s in spec["slots"]],
                                                    "passthrough": spec.get("passthrough")}
        self._json(job)

    def op_jobs_connect(self, a, q, body):
        job = self.state.jobs[a["job_uid"]]
        src = self.state.jobs.get(q["source_job_uid"])
        if src is None or q["source_output_name"] not in src["spec"]["outputs"]:
            return self._json({"detail": "no such source output"}, 422)
        inp = job["spec"]["inputs"][a["input_name"]]
        have = {r["name"] for r in src["spec"]["outputs"][q["source_output_name"]]["results"]}
        missing = [s["name"] for s in inp["slots"] if s.get("required", True) and s["name"] not in have]
        # CryoSPARC v5 (cryosparc-tools 5.0 docs: "If the given source job is missing these slots, the external
        # job cannot start or accept outputs"): the connection is made, a build error is recorded on the job,
        # and mark_running is refused with 422 while it stands.
        for slot in missing:
            job["build_errors"].append({"type": "missing", "loc": ["inputs", a["input_name"], "slots", slot],
                                        "input": None, "ctx": {}, "input_type": "none"})
        inp["connections"] = [{"job_uid": q["source_job_uid"], "output": q["source_output_name"]}]
        self._json(job)

    def _input_dataset(self, job, name) -> Dataset:
        conn = job["spec"]["inputs"][name]["connections"][0]
        return Dataset.load(str(self.state.datasets[(conn["job_uid"], conn["output"])]))

    def op_jobs_load_input(self, a, q, body):
        ds = self._input_dataset(self.state.jobs[a["job_uid"]], a["input_name"])
        buf = io.BytesIO()
        ds.save(buf, format=2)  # CryoSPARC's compressed stream format
        self._send(200, buf.getvalue(), DATASET_MIME)

    def op_jobs_get_output_fields(self, a, q, body):
        out = self.state.jobs[a["job_uid"]]["spec"]["outputs"][a["output_name"]]
        fields = {"alignments3D": [["alignments3D/pose", "<f4", [3]], ["alignments3D/shift", "<f4", [2]],
                                   ["alignments3D/psize_A", "<f4"], ["alignments3D/split", "<u4"],
                                   ["alignments3D/error", "<f4"]],
                  "ctf": [["ctf/df1_A", "<f4"], ["ctf/df2_A", "<f4"]], "blob": [["blob/path", "O"], ["blob/idx", "<u4"]]}
        result = []
        for r in out["results"]:
            result += fields.get(r["dtype"], [])
        self._json(result)

    def op_jobs_save_output(self, a, q, body):
        st = self.state
        job = st.jobs[a["job_uid"]]
        if job["status"] not in ("running", "waiting"):
            return self._json({"detail": "outputs can be saved only while the job is running or waiting"}, 422)
        ds = Dataset.load(io.BytesIO(body))
        path = st.project_dir / job["uid"] / f"{job['uid']}_{a['output_name']}.cs"
        ds.save(str(path))
        st.datasets[(job["uid"], a["output_name"])] = path
        self._json(job)

    def _status(self, a, status, error=None):
        job = self.state.jobs[a["job_uid"]]
        job["status"] = status
        if error:
            self.state.events.append({"job": job["uid"], "type": "error", "text": error})
        self._json(job)

    def op_jobs_mark_running(self, a, q, body):
        job = self.state.jobs[a["job_uid"]]
        if job["build_errors"]:
            return self._json({"detail": f"Job {job['uid']} has build errors and cannot run: " + "; ".join(
                f"{e['type']} {'.'.join(map(str, e['loc']))}" for e in job["build_errors"])}, 422)
        self._status(a, q.get("status", "running"))

    def op_jobs_mark_completed(self, a, q, body):
        self._status(a, "completed")

    def op_jobs_mark_failed(self, a, q, body):
        self._status(a, "failed", q.get("error", "failed"))

    def _event(self, a, text, type_, event_id=None):
        st = self.state
        if event_id:
            ev = next(e for e in st.events if e.get("id") == event_id)
            ev["text"] = text
        else:
            ev = {"id": uuid.uuid4().hex[:24], "job": a["job_uid"], "type": type_, "text": text}
            st.events.append(ev)
        self._json({"_id": ev["id"], "project_uid": a["project_uid"], "job_uid": a["job_uid"], "type": type_,
                    "text": text, "created_at": NOW, "updated_at": NOW})

    def op_jobs_add_event_log(self, a, q, body):
        self._event(a, json.loads(body), q.get("type", "text"))

    def op_jobs_update_event_log(self, a, q, body):
        self._event(a, json.loads(body), q.get("type", "text"), a["event_id"])

    def op_jobs_add_image_log(self, a, q, body):
        self.state.images.append({"job": a["job_uid"], "text": q.get("text"), "files": json.loads(body)})
        self._json({"_id": uuid.uuid4().hex[:24], "project_uid": a["project_uid"], "job_uid": a["job_uid"],
                    "type": "image", "text": q.get("text", ""), "imgfiles": json.loads(body), "created_at": NOW,
                    "updated_at": NOW})

    def op_assets_upload(self, a, q, body):
        fid = uuid.uuid4().hex[:24]
        (self.state.project_dir / a["job_uid"] / f"asset_{fid}_{q.get('filename', 'file')}").write_bytes(body)
        self._json({"fileid": fid, "filename": q.get("filename", "file"), "filetype": q.get("format", "png")})

    def op_projects_upload_file(self, a, q, body):
        target = self.state.project_dir / q["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        self._send(200, b"")


def start(project_dir) -> tuple[ThreadingHTTPServer, State, str]:
    """Start the server on a free loopback port; returns (server, state, base_url)."""
    state = State(project_dir)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"
