"A scripted OpenAI-compatible chat server on loopback, for fault injection."
import json, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def _usage(p=10, c=5): return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

def completion(text, model="fake", usage=(10, 5), fingerprint=None):
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": _usage(*usage)}

def text_completion(text, model="fake", usage=(10, 5), fingerprint=None):
    return {"id": "x", "object": "text_completion", "created": 0, "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": _usage(*usage)}

class FakeServer:
    """`script` is a list of actions consumed one per request: an int status (429, 500, ...), 'stall' (sleep past the
    client timeout), or a string answer; when it runs out, `default` is used (a callable of the request body, or an action)."""
    def __init__(self, script=(), default=lambda body: "echo: " + (body["prompt"] if "prompt" in body else body["messages"][-1]["content"]), stall=3.0, delay=0.0,
                 usage=lambda body, text: (10, 5), serial=False, echo_auth=0):
        "`serial`: one request served at a time, each taking `delay` (a busy server: the wait grows with the queue)."
        self.script, self.default, self.stall, self.delay, self.usage = list(script), default, stall, delay, usage
        self.serial = threading.Lock() if serial else None
        self.echo_auth = echo_auth  # a status (e.g. 401) answered to every request, its message quoting the key sent
        # what the answers say served them: (model, system_fingerprint), or a callable of the request body giving it;
        # None = echo the requested model, no fingerprint.
        # A test may change it mid-run (a provider upgrading the model behind an alias).
        self.served = None
        self.requests, self.auth, self.in_flight, self.max_in_flight = [], [], 0, 0
        self.lock = threading.Lock()
        srv = self
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv.lock:
                    srv.requests.append(body); srv.auth.append(self.headers.get("Authorization"))
                    action = srv.script.pop(0) if srv.script else srv.default
                    srv.in_flight += 1; srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                try:
                    if srv.echo_auth:                               # as some proxies do: the key in the error
                        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                        return self._send(srv.echo_auth, {"error": {"message": f"Incorrect API key provided: {key}",
                                                                    "type": "invalid_request_error"}})
                    if callable(action): action = action(body)
                    if srv.serial:
                        with srv.serial: time.sleep(srv.delay)      # abandoned requests are still served
                    elif srv.delay: time.sleep(srv.delay)
                    if action == "stall": time.sleep(srv.stall); action = "late"
                    if isinstance(action, tuple):                   # (status, Retry-After seconds)
                        self._send(action[0], {"error": {"message": "busy", "type": "injected"}}, {"Retry-After": str(action[1])})
                    elif isinstance(action, int):
                        self._send(action, {"error": {"message": f"injected {action}", "type": "injected"}})
                    else:
                        served = srv.served(body) if callable(srv.served) else srv.served
                        model, fp = served or (body.get("model", "fake"), None)
                        make = text_completion if "prompt" in body else completion
                        self._send(200, make(action, model, srv.usage(body, action), fp))
                finally:
                    with srv.lock: srv.in_flight -= 1
            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code); self.send_header("Content-Type", "application/json")
                    for k, v in (headers or {}).items(): self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError): pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start(); return self
    def __exit__(self, *a): self.httpd.shutdown(); self.httpd.server_close()
