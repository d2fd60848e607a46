"""The parts of the broadcast weight sync that need no SGLang server: bucketing (one dtype per bucket, a size bound,
order kept, an oversized tensor alone), reading the served shapes, argument checks, and the errors when a server
refuses to join or runs a layout SGLang cannot sync (a stand-in HTTP server plays SGLang's control API). The real
exchange with SGLang servers is in test_sglang.py."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save_file

from megatron_sapo.rollout.sglang import SGLangError
from megatron_sapo.buckets import buckets
from megatron_sapo.rollout.weight_sync import WeightUpdateGroup, served_shapes


def test_buckets_keep_order_one_dtype_and_the_size_bound():
    f32, bf16 = torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16)  # 40 and 20 bytes
    pairs = [("a", f32), ("b", f32), ("c", f32), ("d", bf16), ("e", bf16), ("big", torch.zeros(100)), ("f", f32)]
    got = [[name for name, _ in bucket] for bucket in buckets(pairs, 80)]
    assert got == [["a", "b"], ["c"], ["d", "e"], ["big"], ["f"]]
    assert list(buckets(iter(pairs), 1 << 30))[0][0][0] == "a"  # a generator is consumed once, in order
    assert list(buckets([], 80)) == []


def test_served_shapes_read_every_safetensors_file(tmp_path):
    save_file({"x": torch.zeros(2, 3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.zeros(4)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert served_shapes(tmp_path) == {"x": [2, 3], "y": [4]}
    with pytest.raises(FileNotFoundError, match="no safetensors in"):
        served_shapes(tmp_path / "missing")


class FakeSGLang(BaseHTTPRequestHandler):
    """SGLang's answers to the calls that form a group: its model and server info, and a refusal to join (after
    `delay` seconds)."""
    model_path, dp_size, delay = "", 1, 0.0

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/model_info":
            self._answer(200, {"model_path": self.model_path})
        else:
            self._answer(200, {"tp_size": 1, "dp_size": self.dp_size, "pp_size": 1})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        self._answer(400, {"success": False, "message": "Failed to initialize custom process group: no NCCL."})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    handler = type("Handler", (FakeSGLang,), {"model_path": str(tmp_path)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_a_refusal_to_join_is_named_at_once(fake_server):
    server, _ = fake_server
    url = f"http://127.0.0.1:{server.server_port}"
    start = time.monotonic()
    with pytest.raises(SGLangError, match=rf"forming weight-update group 'g' \(trainer = rank 0 of 2 at "
                                          rf"127\.0\.0\.1:\d+, backend gloo\): {url} refused "
                                          r"/init_weights_update_group: Failed .*no NCCL"):
        WeightUpdateGroup([url], master_address="127.0.0.1", backend="gloo", group_name="g", timeout=3)
    assert time.monotonic() - start < 2  # not after the 3 s rendezvous timeout


def test_a_group_not_formed_in_time_names_the_server_and_the_master(fake_server):
    server, handler = fake_server
    url = f"http://127.0.0.1:{server.server_port}"
    handler.delay = 5.0
    start = time.monotonic()
    with pytest.raises(SGLangError, match=rf"forming weight-update group 'g' \(trainer = rank 0 of 2 at "
                                          rf"127\.0\.0\.1:\d+, backend gloo\): .*{url}"):
        WeightUpdateGroup([url], master_address="127.0.0.1", backend="gloo", group_name="g", timeout=2)
    assert time.monotonic() - start < 4


def test_layouts_sglang_cannot_sync_and_bad_arguments_are_named(fake_server):
    server, handler = fake_server
    url = f"http://127.0.0.1:{server.server_port}"
    handler.dp_size = 2
    with pytest.raises(SGLangError, match="dp_size 2, pp_size 1: SGLang joins weight-update groups only with"):
        WeightUpdateGroup([url], master_address="127.0.0.1", backend="gloo")
    with pytest.raises(ValueError, match="backend must be one of"):
        WeightUpdateGroup([url], master_address="127.0.0.1", backend="mpi")
    with pytest.raises(ValueError, match="at least one server URL"):
        WeightUpdateGroup([], master_address="127.0.0.1", backend="gloo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'nccl' needs a CUDA device"):
            WeightUpdateGroup([url], master_address="127.0.0.1")
    with pytest.raises(SGLangError, match="GET http://127.0.0.1:1/model_info failed"):
        WeightUpdateGroup(["http://127.0.0.1:1"], master_address="127.0.0.1", backend="gloo")


def test_routes_from_sglang_are_decoded_and_a_server_without_them_is_named(fake_server):
    import base64

    import numpy as np

    from megatron_sapo.rollout.sglang import SGLangEngine, decode_routes

    ids = np.arange(3 * 4 * 2, dtype=np.int32)
    encoded = base64.b64encode(ids.tobytes()).decode()
    routes = decode_routes(encoded, 3, (4, 2))
    assert routes.dtype == torch.int16 and torch.equal(routes, torch.arange(24, dtype=torch.int16).view(3, 4, 2))
    with pytest.raises(ValueError, match="holds 24 ids; 4 tokens x 4 layers x top-2 = 32 expected"):
        decode_routes(encoded, 4, (4, 2))
    with pytest.raises(ValueError, match="no routed_experts: was the server started with --enable-return-routed"):
        decode_routes(None, 3, (4, 2))
    server, _ = fake_server  # its /server_info has no enable_return_routed_experts
    engine = SGLangEngine(None, urls=[f"http://127.0.0.1:{server.server_port}"], route_shape=(4, 2))
    with pytest.raises(SGLangError, match="was started without --enable-return-routed-experts"):
        engine.check_routes_available()
