"""A tenant that only speaks TCP: an HTTP server on 127.0.0.1:$PORT (never a Unix socket)."""

import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.urandom(4).hex()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"tcp app {INSTANCE} on port {os.environ['PORT']} {socket.gethostname()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
