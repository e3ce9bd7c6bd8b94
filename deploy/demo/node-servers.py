#!/usr/bin/env python3
"""Test servers run inside each demo/test node namespace.

usage: node-servers.py NODE_NAME ECHO_PORT HTTP_PORT [FLOOD_PORT [RAW_ECHO_PORT]]

- ECHO_PORT: per connection, answers each line with
  "node=<name> local=<local ip> echo=<line>".
- HTTP_PORT: answers GET with the body "node=<name>".
- FLOOD_PORT (default ECHO_PORT+1): writes data without end to whoever
  connects, for tests of a client that stops reading.
- RAW_ECHO_PORT (default ECHO_PORT+2): sends back every byte as received
  and half-closes after the client's EOF, for byte-exact tests.
All bind the wildcard address (dual-stack "::" where IPv6 works, else
0.0.0.0), so they answer on the node, pod and service addresses.
Prints "ready" once all sockets are bound.
"""
import socket, socketserver, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]
ECHO_PORT = int(sys.argv[2])
HTTP_PORT = int(sys.argv[3])
FLOOD_PORT = int(sys.argv[4]) if len(sys.argv) > 4 else ECHO_PORT + 1
RAW_ECHO_PORT = int(sys.argv[5]) if len(sys.argv) > 5 else ECHO_PORT + 2

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        local = self.connection.getsockname()[0]
        if local.startswith("::ffff:"):
            local = local[len("::ffff:"):]
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.wfile.write(("node=%s local=%s echo=%s\n" % (NAME, local, line)).encode())
            self.wfile.flush()

class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

class Flood(socketserver.BaseRequestHandler):
    def handle(self):
        chunk = b"x" * 65536
        try:
            while True:
                self.request.sendall(chunk)
        except OSError:
            pass

class RawEcho(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass

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

def serve(server_cls, handler, port):
    """Dual-stack listener on [::]:port, or 0.0.0.0:port without IPv6."""
    class DualStack(server_cls):
        address_family = socket.AF_INET6
        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()
    try:
        return DualStack(("::", port), handler)
    except OSError:
        return server_cls(("0.0.0.0", port), handler)

echo = serve(EchoServer, Echo, ECHO_PORT)
http = serve(HttpServer, Http, HTTP_PORT)
flood = serve(EchoServer, Flood, FLOOD_PORT)
raw = serve(EchoServer, RawEcho, RAW_ECHO_PORT)
threading.Thread(target=echo.serve_forever, daemon=True).start()
threading.Thread(target=flood.serve_forever, daemon=True).start()
threading.Thread(target=raw.serve_forever, daemon=True).start()
print("ready", flush=True)
http.serve_forever()
