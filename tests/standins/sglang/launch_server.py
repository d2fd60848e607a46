"""Stands in for `sglang.launch_server` (see __init__.py): a subprocess like SGLang's scheduler, and /health on
--port."""

import http.server
import subprocess
import sys

port = int(sys.argv[sys.argv.index("--port") + 1])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
