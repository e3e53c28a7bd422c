"""Preemption notices in one process: a signal, or the Cloud TPU maintenance event (served here by a
local stand-in for the metadata server), asks the loop to stop; handlers are put back afterwards."""
import http.server
import signal
import threading
import time

from keel_jax.preemption import Preemption


def serve(answers: list[str]):
  """A metadata-server stand-in answering each GET with the next of `answers` (the last repeats)."""
  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      assert self.headers["Metadata-Flavor"] == "Google"
      body = (answers.pop(0) if len(answers) > 1 else answers[0]).encode()
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("localhost", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://localhost:{server.server_address[1]}/maintenance-event?wait_for_change=true"


def test_maintenance_notice_becomes_a_sigterm_and_stops_the_loop():
  before = signal.getsignal(signal.SIGTERM)
  server, url = serve(["NONE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE"])
  try:
    p = Preemption(maintenance_url=url)
    deadline = time.monotonic() + 10
    while not p.should_stop(1) and time.monotonic() < deadline:
      time.sleep(0.01)
    assert p.signal == signal.SIGTERM and p.should_stop(2)
    p.close()
  finally:
    server.shutdown()
  assert signal.getsignal(signal.SIGTERM) == before


def test_no_notice_no_stop_and_signals_set_the_flag():
  p = Preemption(maintenance_url="http://localhost:9/unreachable")  # gives up quietly
  try:
    assert not p.should_stop(1)
    signal.raise_signal(signal.SIGINT)
    assert p.signal == signal.SIGINT and p.should_stop(2)
  finally:
    p.close()
