"""Loading HF weights adds no private copy of the model: the peak extra anonymous memory of a load (the process's
RssAnon, polled every 0.5 ms) stays below half a layer and does not grow with the model (4 and 8 layers, 65 and
128 MB; measured ~2 MB for both). safetensors maps the files, so the tensors themselves are file pages (page cache,
shared by a node's ranks and reclaimable), which RssAnon leaves out; a loader that copied or converted every tensor
first (eager dtype casts, clones) would add the whole model here."""

import json
import os
import subprocess
import sys

from .harness import tiny_models

PROBE = r"""
import json, sys, threading, time, torch
torch.set_num_threads(1)
from megatron_sapo.policy import parallel
parallel.init_distributed()
from megatron_sapo.policy.config import PolicyConfig
from megatron_sapo.policy.hf_weights import load_hf_weights
from megatron_sapo.policy.model import padded_vocab_size
from megatron_sapo.policy.policy import Policy

policy = Policy(PolicyConfig(model_path=sys.argv[1]))
model = policy.model.module

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [0], threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)

base = anon()
watcher = threading.Thread(target=poll)
watcher.start()
load_hf_weights(model, policy.arch, sys.argv[1], padded_vocab_size(policy.arch, policy.cfg))
done.set()
watcher.join()
print(json.dumps({"extra": peak[0] - base, "model": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def test_load_holds_one_parameters_tensors_not_the_model(tmp_path):
    measured = {}
    for layers in (4, 8):
        folder = tmp_path / f"layers_{layers}"
        tiny_models().build("qwen3_moe", folder, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=64, num_hidden_layers=layers, num_experts=8, moe_intermediate_size=256)
        run = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        measured[layers] = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured[8]["model"] > 1.8 * measured[4]["model"] > 100e6, measured
    one_layer = measured[8]["model"] / 8
    for layers, m in measured.items():
        assert m["extra"] < one_layer / 2, (layers, measured)
    assert abs(measured[8]["extra"] - measured[4]["extra"]) < one_layer / 4, measured
