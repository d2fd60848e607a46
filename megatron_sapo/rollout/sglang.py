"""The SGLang rollout engine: SGLang servers started as subprocesses (local) or attached by URL (cluster), spoken to
over HTTP. The only place that knows SGLang's API, with weight_sync.py (weights broadcast over a process group).

- Prompts are tokenised here and sent as input_ids, so the completion's prompt ids are exact; each of the n samples
  of a prompt is its own request, spread round-robin over the servers by a bounded thread pool.
- A request that fails on a dropped connection, or gets no answer within `request_timeout`, is retried on the next
  server; a local server whose process died, or that does not answer /health within `hang_timeout` (hung, or
  stopped by SIGSTOP), is killed and restarted (and waited for) and its requests re-sent, so a batch completes
  whatever happens to one server. Each retry and restart is logged (a warning naming the server and the error) and
  counted in `stats`.
- Weight sync: POST /update_weights_from_disk with the exported folder and a weight_version, then /flush_cache;
  responses carry meta_info.weight_version, which the caller can check. A local server that dies or hangs during the
  update is restarted from the new folder and tagged with the new version, so the update completes with the right
  weights everywhere. weight_sync.py broadcasts tensors instead.
- The server may live in its own virtual environment (its pins cannot clash with the trainer's): `python` names
  that environment's interpreter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import lifeline
from .engine import Completion, SamplingParams, check_prompts

log = logging.getLogger(__name__)

class SGLangError(RuntimeError):
    pass


# config.json keys that fix the weights' shapes: an update must agree on all of them
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size",
              "tie_word_embeddings")


def _parse(body: str) -> dict:
    try:
        return json.loads(body) if body.strip() else {}
    except json.JSONDecodeError:  # some endpoints (/flush_cache) answer in plain text
        return {"text": body}


def _post(url: str, payload: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return _parse(response.read().decode(errors="replace"))


def _control(url: str, endpoint: str, payload: dict, timeout: float) -> dict:
    """POST to a control endpoint (weights, cache, update groups) of the server at `url`. SGLang answers a refusal
    with HTTP 400 and {success: false, message}: that is an SGLangError naming the server, the endpoint and why."""
    try:
        result = _post(url + endpoint, payload, timeout)
    except urllib.error.HTTPError as err:
        result = _parse(err.read().decode(errors="replace"))
        reason = result.get("message") or result.get("detail") or result.get("text") or f"HTTP {err.code}"
        raise SGLangError(f"{url} refused {endpoint}: {reason}") from None
    if result.get("success") is False:
        raise SGLangError(f"{url} refused {endpoint}: {result.get('message')}")
    return result


def _get(url: str, timeout: float) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


def _get_json(url: str, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        raise SGLangError(f"GET {url} failed: {err}") from err


SHIELDED_LAUNCHER = Path(__file__).with_name("sglang_launch_shielded.py")


class SGLangServer:
    """One local SGLang server process (CPU or GPU); its log goes to `log_path`. It ignores SIGINT, SIGTERM and
    SIGUSR1, which Slurm sends every process of the trainer's job step (sglang_launch_shielded.py); stop() ends it
    with SIGKILL to its process group (a session of its own, which holds only the server), and it ends by itself
    with the process that started it (lifeline.py)."""

    def __init__(self, model_dir: str | Path, port: int, *, python: str = "python", log_path: str | Path,
                 extra_args: tuple[str, ...] = (), env: dict | None = None, startup_timeout: float = 300.0):
        self.model_dir, self.port, self.python = str(model_dir), port, python
        self.log_path, self.extra_args, self.env = Path(log_path), tuple(extra_args), dict(env or {})
        self.startup_timeout = startup_timeout
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [self.python, str(SHIELDED_LAUNCHER), "--model-path", self.model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **self.env, **lifeline.env_for_exec()})
        log.close()
        self.wait_ready()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SGLangError(f"SGLang server on port {self.port} exited with code {self.process.returncode}:\n"
                                  f"{self.last_log_lines()}")
            try:
                if _get(self.url + "/health", timeout=5) == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise SGLangError(f"SGLang server on port {self.port} not ready after {self.startup_timeout:.0f} s:\n"
                          f"{self.last_log_lines()}")

    def last_log_lines(self, count: int = 30) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        with self.log_path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=count))

    def responsive(self, timeout: float) -> bool:
        """Whether the server answers /health within `timeout` seconds (polled each second); False at once when its
        process exits meanwhile."""
        deadline = time.monotonic() + timeout
        while self.alive():
            left = deadline - time.monotonic()
            try:
                if _get(self.url + "/health", timeout=max(1.0, min(5.0, left))) == 200:
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)
        return False

    def stop(self) -> None:
        """SIGKILL to the server's process group (it ignores SIGTERM), and wait for the launcher's end."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


def decode_routes(encoded: str | None, fed: int, route_shape: tuple[int, int]) -> torch.Tensor:
    """SGLang's meta_info["routed_experts"] (base64 of int32 [tokens fed, num_layers, top-k]: every token but the
    last went through the model) as [fed, num_layers, k] int16; ValueError if absent or of another size."""
    import base64

    import numpy as np

    if encoded is None:
        raise ValueError("the SGLang response holds no routed_experts: was the server started with "
                         "--enable-return-routed-experts?")
    flat = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    layers, k = route_shape
    if flat.size != fed * layers * k:
        raise ValueError(f"routed_experts holds {flat.size} ids; {fed} tokens x {layers} layers x top-{k} = "
                         f"{fed * layers * k} expected")
    return torch.from_numpy(flat.astype(np.int16)).view(fed, layers, k)


class SGLangEngine:
    """Generation over one or more SGLang servers: local SGLangServer objects (restartable) and/or URLs."""

    def __init__(self, tokenizer, *, servers: list[SGLangServer] = (), urls: list[str] = (),
                 concurrency: int = 16, retries: int = 3, request_timeout: float = 600.0, hang_timeout: float = 60.0,
                 route_shape: tuple[int, int] | None = None):
        if not servers and not urls:
            raise ValueError("SGLangEngine needs at least one server or URL")
        self.tokenizer = tokenizer
        self.route_shape = route_shape  # (num_layers, top-k) of the served MoE model, to decode returned routes
        self.servers = list(servers)
        self.urls = [s.url for s in self.servers] + [u.rstrip("/") for u in urls]
        self.concurrency, self.retries, self.request_timeout = concurrency, retries, request_timeout
        self.hang_timeout = hang_timeout
        self._next = 0
        self._lock = threading.Lock()
        self._restart_locks = [threading.Lock() for _ in self.servers]
        self._starts = [0 for _ in self.servers]  # restarts of each server, so that one failure restarts it once
        self.stats = {"retries": 0, "restarts": 0}
        self._shut_down = False  # after shutdown() a failed request is not retried (its server was stopped on purpose)
        self.weights: tuple[str, str] | None = None  # (folder, version) of the last disk update
        self.version: str | None = None  # of the last update by either transport (note_version for the broadcast)
        for url in self.urls:
            self._check_reachable(url)

    def _check_reachable(self, url: str) -> None:
        try:
            _get(url + "/health", timeout=10)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            raise SGLangError(f"SGLang server {url} is unreachable: {err}") from err

    def _pick(self) -> int:
        with self._lock:
            index = self._next % len(self.urls)
            self._next += 1
        return index

    def _revive(self, index: int, weights: tuple[str, str] | None = None) -> bool:
        """After a failed request to a local server: restart it if its process died or it does not answer /health
        within hang_timeout (hung, or stopped), serving `weights` (folder, version; default: the last update's).
        Returns whether it restarted the server. URL-only servers are left to their owner."""
        if self._shut_down:
            raise SGLangError("the SGLang engine was shut down")
        if index >= len(self.servers):
            time.sleep(1.0)
            return False
        server = self.servers[index]
        updating = weights is not None  # restarted for an update in progress: it loads that update's folder
        weights = weights or self.weights
        starts = self._starts[index]
        with self._restart_locks[index]:
            if self._starts[index] != starts:  # another request's failure restarted it while we waited
                return False
            if server.alive() and server.responsive(self.hang_timeout):
                return False
            if server.alive():  # (not when it died while we asked)
                log.warning("SGLang server %s does not answer /health within %.0f s (hung or stopped): killing it",
                            server.url, self.hang_timeout)
                server.stop()
            else:
                log.warning("SGLang server %s is gone (exit code %s)", server.url,
                            server.process.poll() if server.process else None)
            if weights is not None:  # a restart loads this folder, and its responses must carry its version
                server.model_dir = weights[0]
            log.warning("restarting SGLang server %s from %s (its log: %s)", server.url, server.model_dir,
                        server.log_path)
            server.stop()
            server.start()
            if weights is not None:
                _control(server.url, "/update_weights_from_disk",
                         {"model_path": weights[0], "weight_version": weights[1]}, self.request_timeout)
            self._starts[index] += 1
            with self._lock:
                self.stats["restarts"] += 1
            log.warning("SGLang server %s restarted (%d restarts in this run)", server.url, self.stats["restarts"])
            if not updating and weights is not None and self.version not in (None, weights[1]):
                log.warning("SGLang server %s serves version %s, the newest folder: version %s came by the "
                            "distributed sync, which leaves no folder, and reaches it at the next weight sync; its "
                            "samples until then are off-policy (rollout/stale_frac)", server.url, weights[1],
                            self.version)
            return True

    def _request(self, payload: dict) -> dict:
        last_error = None
        index = self._pick()
        for attempt in range(self.retries + 1):
            try:
                return _post(self.urls[index] + "/generate", payload, self.request_timeout)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                last_error = err
                if attempt == self.retries:
                    break
                with self._lock:
                    self.stats["retries"] += 1
                log.warning("generation request to %s failed (%s); retry %d of %d", self.urls[index], err,
                            attempt + 1, self.retries)
                self._revive(index)
                index = (index + 1) % len(self.urls)
        raise SGLangError(f"generation failed after {self.retries + 1} attempts: {last_error}")

    def check_routes_available(self) -> None:
        """That every server was started with --enable-return-routed-experts (SGLangError naming the one that was
        not): without it SGLang returns no routes, and routing replay from the engine (r3) cannot work."""
        if self.route_shape is None:
            raise ValueError("SGLangEngine(route_shape=(num_layers, top_k)) is needed to decode routes")
        for url in self.urls:
            info = _get_json(url + "/server_info", 30)
            if not info.get("enable_return_routed_experts"):
                raise SGLangError(f"SGLang server {url} was started without --enable-return-routed-experts: it "
                                  "cannot return the routes that policy.routing_replay=r3 (or rollout.return_routes) "
                                  "asks for")

    def generate(self, prompts: list[str], n: int, params: SamplingParams,
                 return_routes: bool = False) -> list[list[Completion]]:
        check_prompts(prompts, n)
        if return_routes and self.route_shape is None:
            raise ValueError("SGLangEngine(route_shape=(num_layers, top_k)) is needed to decode routes")
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # every parameter that changes the distribution is sent: a server may otherwise take its defaults from the
        # model's generation_config (a repetition penalty, min_p), which the trainer's log-probs know nothing of
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or -1,
                    "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                    "max_new_tokens": params.max_new_tokens, "stop": list(params.stop)}
        jobs = []
        for i, ids in enumerate(prompt_ids):
            for k in range(n):
                job = dict(sampling)
                if params.seed is not None:
                    job["sampling_seed"] = params.seed + i * n + k
                jobs.append({"input_ids": ids, "sampling_params": job, "return_logprob": True,
                             "logprob_start_len": -1, "return_routed_experts": return_routes})
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            responses = list(pool.map(self._request, jobs))
        out = [self._completion(ids, r, self.route_shape if return_routes else None)
               for ids, r in zip((ids for ids in prompt_ids for _ in range(n)), responses)]
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def _completion(prompt_ids: list[int], response: dict, route_shape: tuple[int, int] | None) -> Completion:
        meta = response.get("meta_info", {})
        logprobs = meta.get("output_token_logprobs") or []
        output_ids = response.get("output_ids") or [entry[1] for entry in logprobs]
        finish = meta.get("finish_reason") or {}
        reason = "length" if finish.get("type") == "length" else "stop"
        routes = None
        if route_shape is not None:
            routes = decode_routes(meta.get("routed_experts"), len(prompt_ids) + len(output_ids) - 1, route_shape)
        return Completion(prompt_ids=list(prompt_ids), output_ids=list(output_ids),
                          output_logprobs=[float(entry[0]) for entry in logprobs], text=response.get("text", ""),
                          finish_reason=reason, weight_version=str(meta.get("weight_version", "")), routes=routes)

    def update_weights(self, model_dir: str | Path, version: str) -> None:
        """Load the exported folder on every server and tag later responses with `version`. The folder's shapes are
        checked against each local server's model first: SGLang dies on weights of the wrong shape."""
        config_path = Path(model_dir) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
        new = json.loads(config_path.read_text())
        for server in self.servers:
            served = json.loads((Path(server.model_dir) / "config.json").read_text())
            diff = {k: (served.get(k), new.get(k)) for k in SHAPE_KEYS if served.get(k) != new.get(k)}
            if diff:
                raise ValueError(f"{model_dir} does not fit the served model {server.model_dir}: " +
                                 ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items()))
        weights = (str(model_dir), version)
        for index, url in enumerate(self.urls):
            self._update_one(index, url, weights)
        self.weights = weights
        self.version = version

    def note_version(self, version: str) -> None:
        """Record an update made by the distributed sync (weight_sync.py), which the engine does not see."""
        self.version = version

    def _update_one(self, index: int, url: str, weights: tuple[str, str]) -> None:
        """Load `weights` on one server. A local server that dies, or does not answer within request_timeout, is
        restarted from the folder with its version (or, found alive and answering after all, asked again)."""
        for attempt in range(self.retries + 1):
            try:
                _control(url, "/update_weights_from_disk", {"model_path": weights[0], "weight_version": weights[1]},
                         self.request_timeout)
                _control(url, "/flush_cache", {}, 60)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                if index >= len(self.servers) or attempt == self.retries:
                    raise SGLangError(f"SGLang server {url} failed during the weight update to version "
                                      f"{weights[1]} ({err})") from err
                log.warning("weight update of SGLang server %s to version %s failed (%s)", url, weights[1], err)
                if self._revive(index, weights):
                    break
        if index < len(self.servers):  # a restart loads these weights, even once older folders are deleted
            self.servers[index].model_dir = weights[0]

    def shutdown(self) -> None:
        self._shut_down = True
        for server in self.servers:
            server.stop()
