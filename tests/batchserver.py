"""A loopback server with the OpenAI Batch API's endpoints (/v1/files, /v1/batches, list, file content) and chat
completions, made to behave like the real one where money is at stake: an expired or cancelled batch keeps (and
bills) the requests it finished and puts them in its output file; a batch over the request limit is refused; each
batch call can fail transiently once; a create can succeed on the server while its answer is lost."""
import json, threading
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def _answer(body):
    return "echo: " + (body["prompt"] if "prompt" in body else body["messages"][-1]["content"])

def _chat(body, text):
    return {"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

CALLS = ("files.create", "batches.create", "batches.retrieve", "batches.list", "files.content")

class BatchServer:
    """`outcome`: 'completed' | 'failed' | 'expired' | 'cancelled' (these two answer the first half of the requests
    and bill them) | 'hold' (in progress until `outcome` changes); `bad`: indexes of requests that come back with a
    request-level error; `max_requests`: a batch with more lines is refused (400); `flaky`: calls (of `CALLS`) that
    answer 500 the first time; `lost_create`: the first create succeeds but answers 500. Counts uploads, batches
    created, polls, interactive calls, and the requests billed at the batch price (`billed`)."""
    def __init__(self, outcome="completed", bad=(), max_requests=50000, flaky=(), lost_create=False):
        self.outcome, self.bad, self.max_requests, self.flaky = outcome, set(bad), max_requests, set(flaky)
        self.lost_create = lost_create
        self.files, self.batches, self.created, self.polls, self.interactive, self.failed_calls = {}, {}, 0, 0, 0, []
        self.lock = threading.Lock()
        srv = self
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def _send(self, obj, code=200, raw=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code); self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
            def _flaky(self, call):
                if call in srv.flaky:
                    srv.flaky.discard(call); srv.failed_calls.append(call)
                    self._send({"error": {"message": f"transient {call}", "type": "server_error"}}, 500)
                    return True
                return False
            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                with srv.lock:
                    if self.path.endswith("/files"):
                        if self._flaky("files.create"): return
                        msg = BytesParser().parsebytes(b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + data)
                        part = next(p for p in msg.get_payload() if p.get_param("name", header="content-disposition") == "file")
                        fid = f"file-{len(srv.files)}"
                        srv.files[fid] = part.get_payload(decode=True)
                        return self._send({"id": fid, "object": "file", "bytes": len(srv.files[fid]), "created_at": 0,
                                           "filename": part.get_filename(), "purpose": "batch", "status": "processed"})
                    if self.path.endswith("/batches"):
                        if self._flaky("batches.create"): return
                        body = json.loads(data)
                        n = len([l for l in srv.files[body["input_file_id"]].splitlines() if l.strip()])
                        if n > srv.max_requests:
                            return self._send({"error": {"message": f"{n} requests > {srv.max_requests} per batch",
                                                         "type": "invalid_request_error"}}, 400)
                        srv.created += 1
                        bid = f"batch-{srv.created}"
                        srv.batches[bid] = {"input": body["input_file_id"], "endpoint": body["endpoint"],
                                            "metadata": body.get("metadata") or {}}
                        if srv.lost_create:
                            srv.lost_create = False; srv.failed_calls.append("batches.create (created)")
                            return self._send({"error": {"message": "lost", "type": "server_error"}}, 500)
                        return self._send(srv._batch(bid))
                    srv.interactive += 1
                    return self._send(_chat({}, _answer(json.loads(data))))
            def do_GET(self):
                with srv.lock:
                    path = self.path.split("?")[0]
                    if path.endswith("/batches"):
                        if self._flaky("batches.list"): return
                        data = [srv._batch(b) for b in reversed(list(srv.batches))]
                        return self._send({"object": "list", "data": data, "has_more": False,
                                           "first_id": data[0]["id"] if data else None,
                                           "last_id": data[-1]["id"] if data else None})
                    if "/batches/" in path:
                        if self._flaky("batches.retrieve"): return
                        srv.polls += 1
                        return self._send(srv._batch(path.rsplit("/", 1)[1]))
                    if path.endswith("/content"):
                        if self._flaky("files.content"): return
                        return self._send(None, raw=srv.files[path.split("/")[-2]])
                    self._send({"error": {"message": "not found"}}, 404)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def billed(self) -> int:
        "Requests answered by batches (what the provider bills at the batch price)."
        return sum(len([l for l in self.files[f"out-{b}"].splitlines() if l.strip()]) for b in self.batches
                   if f"out-{b}" in self.files)

    def _batch(self, bid):
        b, lines = self.batches[bid], [json.loads(l) for l in self.files[self.batches[bid]["input"]].splitlines() if l.strip()]
        status, out_id, err_id, ok, failed = self.outcome, None, None, 0, 0
        if status == "hold":
            status = "in_progress"
        if status in ("completed", "expired", "cancelled"):
            done = len(lines) if status == "completed" else len(lines) // 2   # an ended batch keeps what it finished
            out, err = [], []
            for i, l in enumerate(lines[:done]):
                if i in self.bad:
                    err.append({"custom_id": l["custom_id"], "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}, "error": None})
                else:
                    out.append({"custom_id": l["custom_id"], "response": {"status_code": 200, "body": _chat(l["body"], _answer(l["body"]))}, "error": None})
            for l in lines[done:]:
                err.append({"custom_id": l["custom_id"], "response": None,
                            "error": {"code": "batch_expired", "message": f"This request could not be executed before the batch was {status}."}})
            out_id, err_id = f"out-{bid}", f"err-{bid}"
            self.files[out_id] = "".join(json.dumps(x) + "\n" for x in out).encode()
            self.files[err_id] = "".join(json.dumps(x) + "\n" for x in err).encode()
            ok, failed = len(out), len(err)
        return {"id": bid, "object": "batch", "endpoint": b["endpoint"], "completion_window": "24h", "created_at": 0,
                "input_file_id": b["input"], "status": status, "output_file_id": out_id, "error_file_id": err_id,
                "metadata": b["metadata"], "request_counts": {"total": len(lines), "completed": ok, "failed": failed}}
    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start(); return self
    def __exit__(self, *a): self.httpd.shutdown(); self.httpd.server_close()
