#!/usr/bin/env python3
"""Test servers run inside each demo/test node namespace.

usage: node-servers.py NODE_NAME ECHO_PORT HTTP_PORT

- ECHO_PORT: per connection, answers each line with
  "node=<name> local=<local ip> echo=<line>".
- HTTP_PORT: answers GET with the body "node=<name>".
Both bind 0.0.0.0, so they answer on the node, pod and service addresses.
Prints "ready" once both sockets are bound.
"""
import socket, socketserver, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]
ECHO_PORT = int(sys.argv[2])
HTTP_PORT = int(sys.argv[3])

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        local = self.connection.getsockname()[0]
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.wfile.write(("node=%s local=%s echo=%s\n" % (NAME, local, line)).encode())
            self.wfile.flush()

class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

class Http(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("node=%s\n" % NAME).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class HttpServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

echo = EchoServer(("0.0.0.0", ECHO_PORT), Echo)
http = HttpServer(("0.0.0.0", HTTP_PORT), Http)
threading.Thread(target=echo.serve_forever, daemon=True).start()
print("ready", flush=True)
http.serve_forever()
