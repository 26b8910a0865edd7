"A loopback server with the OpenAI Batch API's endpoints (/v1/files, /v1/batches, file content) and chat completions."
import json, threading
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def _answer(body):
    return "echo: " + (body["prompt"] if "prompt" in body else body["messages"][-1]["content"])

def _chat(body, text):
    return {"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

class BatchServer:
    """`outcome`: 'completed' | 'failed' | 'expired' | 'hold' (in progress until `outcome` changes); `bad`: indexes of
    requests that come back with a request-level error. Counts uploads, batches created, polls and interactive calls."""
    def __init__(self, outcome="completed", bad=()):
        self.outcome, self.bad = outcome, set(bad)
        self.files, self.batches, self.created, self.polls, self.interactive = {}, {}, 0, 0, 0
        self.lock = threading.Lock()
        srv = self
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def _send(self, obj, code=200, raw=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code); self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                with srv.lock:
                    if self.path.endswith("/files"):
                        msg = BytesParser().parsebytes(b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + data)
                        part = next(p for p in msg.get_payload() if p.get_param("name", header="content-disposition") == "file")
                        fid = f"file-{len(srv.files)}"
                        srv.files[fid] = part.get_payload(decode=True)
                        return self._send({"id": fid, "object": "file", "bytes": len(srv.files[fid]), "created_at": 0,
                                           "filename": part.get_filename(), "purpose": "batch", "status": "processed"})
                    if self.path.endswith("/batches"):
                        body = json.loads(data)
                        srv.created += 1
                        bid = f"batch-{srv.created}"
                        srv.batches[bid] = {"input": body["input_file_id"], "endpoint": body["endpoint"]}
                        return self._send(srv._batch(bid))
                    srv.interactive += 1
                    return self._send(_chat({}, _answer(json.loads(data))))
            def do_GET(self):
                with srv.lock:
                    if "/batches/" in self.path:
                        srv.polls += 1
                        return self._send(srv._batch(self.path.rsplit("/", 1)[1]))
                    if self.path.endswith("/content"):
                        return self._send(None, raw=srv.files[self.path.split("/")[-2]])
                    self._send({"error": {"message": "not found"}}, 404)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _batch(self, bid):
        b, lines = self.batches[bid], [json.loads(l) for l in self.files[self.batches[bid]["input"]].splitlines() if l.strip()]
        status, out_id, err_id, ok, failed = self.outcome, None, None, 0, 0
        if status == "hold":
            status = "in_progress"
        if status == "completed":
            out, err = [], []
            for i, l in enumerate(lines):
                if i in self.bad:
                    err.append({"custom_id": l["custom_id"], "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}, "error": None})
                else:
                    out.append({"custom_id": l["custom_id"], "response": {"status_code": 200, "body": _chat(l["body"], _answer(l["body"]))}, "error": None})
            out_id, err_id = f"out-{bid}", f"err-{bid}"
            self.files[out_id] = "".join(json.dumps(x) + "\n" for x in out).encode()
            self.files[err_id] = "".join(json.dumps(x) + "\n" for x in err).encode()
            ok, failed = len(out), len(err)
        return {"id": bid, "object": "batch", "endpoint": b["endpoint"], "completion_window": "24h", "created_at": 0,
                "input_file_id": b["input"], "status": status, "output_file_id": out_id, "error_file_id": err_id,
                "request_counts": {"total": len(lines), "completed": ok, "failed": failed}}
    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start(); return self
    def __exit__(self, *a): self.httpd.shutdown(); self.httpd.server_close()
