"""The training config: YAML + dotted overrides into one dataclass per component; every mistake is a ValueError that
names the dotted key; the recipes shipped in recipes/ all load."""

from pathlib import Path

import pytest

from megatron_sapo.config import TrainConfig, dump_yaml, flatten, load_config, save_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_the_documented_keys():
    cfg = load_config()
    assert cfg == TrainConfig()
    flat = flatten(to_dict(cfg))
    for key in ("output_dir", "trainer.steps", "rollout.engine", "loss.loss_type", "policy.tensor_model_parallel_size",
                "policy.pipeline_model_parallel_size", "policy.expert_model_parallel_size"):
        assert key in flat
    assert flat["rollout.engine"] == "embedded" and flat["loss.loss_type"] == "sapo"
    assert flat["loss.tau_pos"] == 1.0 and flat["loss.tau_neg"] == 1.05 and flat["trainer.mini_batches"] == 4


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: /x\ntrainer: {steps: 7}\npolicy: {lr: 3e-4, model_path: m}\n"
                    "rollout: {sglang: {urls: ['http://h:1']}}\n")
    cfg = load_config(path, ["trainer.steps=9", "loss.loss_type=gspo", "rollout.engine=sglang",
                             "rollout.sglang.env.A=b", 'rollout.stop=["\\n"]', "trainer.eval_temperature=null",
                             "policy.expert_model_parallel_size=2", "trainer.steps=11"])
    assert cfg.output_dir == "/x" and cfg.trainer.steps == 11 and cfg.policy.lr == 3e-4  # PyYAML reads 3e-4 as text
    assert cfg.loss.loss_type == "gspo" and cfg.loss.clip_eps == (3e-4, 4e-4)
    assert cfg.rollout.engine == "sglang" and cfg.rollout.sglang.urls == ["http://h:1"]
    assert cfg.rollout.sglang.env == {"A": "b"} and cfg.rollout.stop == ["\n"]
    assert cfg.policy.expert_model_parallel_size == 2 and cfg.trainer.eval_temperature is None


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["trainer.steps=3", "rewards.function_kwargs.ignore_case=true", "data.eval_files=[a]"])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(path) == cfg
    assert "steps: 3" in dump_yaml(cfg) and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("overrides, message", [
    (["trainer.stepz=3"], "unknown key trainer.stepz; trainer has: steps, "),
    (["nonsense=1"], "unknown key nonsense; the top level has: output_dir"),
    (["policy.lr=abc"], "policy.lr: expected a number, got 'abc'"),
    (["trainer.steps=2.5"], "trainer.steps: expected int, got 2.5"),
    (["trainer.resume=maybe"], "trainer.resume: expected true or false"),
    (["trainer=3"], "trainer: expected a mapping of TrainerConfig keys"),
    (["loss.loss_type=foo"], "unknown loss.loss_type 'foo'; expected one of: sapo"),
    (["loss.tau_neg=0"], "loss.tau_neg must be a finite number > 0"),
    (["policy.tensor_model_parallel_size=0"], "policy.tensor_model_parallel_size must be an integer >= 1"),
    (["rollout.engine=vllm"], "unknown rollout.engine 'vllm'; expected one of: embedded, sglang"),
    (["rollout.temperature=0"], "rollout.temperature must be a finite number > 0"),
    (["rollout.sglang.urls=[localhost:30000]"], "rollout.sglang.urls must be http(s) URLs"),
    (["rollout.sglang.num_servers=0"], "rollout.sglang.num_servers must be an integer >= 1"),
    (["data.prompts_per_step=0"], "data.prompts_per_step must be an integer >= 1"),
    (["rewards.function=nope"], "rewards.function"),
    (["trainer.advantage_estimator=ppo"], "unknown trainer.advantage_estimator 'ppo'"),
    (["tracking.retry_interval_s=0"], "tracking.retry_interval_s"),
    (["trainer.rank_timeout_s=-1"], "trainer.rank_timeout_s must be >= 0 seconds (0: no rank watchdog), got -1.0"),
    (["trainer.rank_timeout_s=.inf"], "trainer.rank_timeout_s must be >= 0 seconds"),
    (["trainer.steps"], "not of the form dotted.key=value"),
    (["trainer..steps=1"], "not of the form dotted.key=value"),
    (["output_dir=/a", "output_dir.x=1"], "output_dir is not a section"),
    (["output_dir.x=1"], "override 'output_dir.x=1': output_dir is not a section"),
    (["rollout.sglang.nope=1"], "unknown key rollout.sglang.nope; rollout.sglang has: urls, num_servers, "),
    (["trainer={stepz: 1}"], "unknown key trainer.stepz; trainer has: steps, "),
    (["trainer.steps=true"], "trainer.steps: expected int, got True"),  # a bool is not an integer
    (["policy.lr=false"], "policy.lr: expected a number, got False"),
    (["trainer.steps=null"], "trainer.steps: expected int, got None"),
    (["trainer.eval_temperature=[1]"], "trainer.eval_temperature: expected a number or null, got [1]"),
    (["rollout.sglang.gpus=[0, a]"], "rollout.sglang.gpus[1]: expected int, got 'a'"),
    (["rollout.stop=abc"], "rollout.stop: expected a list, got 'abc'"),
    (["data.train_files=[a, [b]]"], "data.train_files[1]: expected a string, got ['b']"),
    (["trainer=[1]"], "trainer: expected a mapping of TrainerConfig keys, got [1]"),
    (["loss.clip_ratio_c=0.5"], "loss.clip_ratio_c (dual clip) must be > 1 or None to disable, got 0.5"),
    (["rollout.sglang.gpus=[2, 3, 4]", "rollout.sglang.num_servers=2"], "rollout.sglang.gpus: 3 GPUs do not split"),
    (["tracking.run_name=${nope}"], "tracking.run_name: Interpolation key 'nope' not found"),
    (["trainer.steps=${output_dir}"], "trainer.steps: While dereferencing interpolation '${output_dir}'"),
])
def test_mistakes_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=None) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert type(err.value) is ValueError  # no OmegaConf exception (its ValidationError is a ValueError) reaches a user


def test_yaml_mistakes_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    for text, message in [("rollout: {sglang: {nope: 1}}\n", "unknown key rollout.sglang.nope; rollout.sglang has: "),
                          ("trainer: {steps: true}\n", "trainer.steps: expected int, got True"),
                          ("trainer:\n", "trainer: expected a mapping of TrainerConfig keys, got None"),
                          ("rewards: {function_kwargs: {day: 2024-01-02}}\n",
                           "rewards.function_kwargs.day: expected a number, string, bool, list or mapping, got "
                           "datetime.date(2024, 1, 2)"),
                          ("loss: {loss_type: foo}\n", "unknown loss.loss_type 'foo'; expected one of: sapo"),
                          ("policy: {min_lr: 1e-3, lr: 1e-4}\n", "policy.min_lr (0.001) must not exceed lr (0.0001)")]:
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            load_config(path)
        assert message in str(err.value) and type(err.value) is ValueError


def test_overrides_merge_into_nested_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer: {eval_every: 5}\nrollout: {sglang: {num_servers: 2, env: {A: a}}}\n"
                    "rewards: {function_kwargs: {b: 2}}\n")
    cfg = load_config(path, ["rollout.sglang.num_servers=4", "rollout.sglang.env.B=b", "trainer={steps: 3}",
                             "rewards.function_kwargs={a: 1}", "policy.model_path="])
    assert cfg.rollout.sglang.num_servers == 4 and cfg.rollout.sglang.env == {"A": "a", "B": "b"}
    assert cfg.trainer.steps == 3 and cfg.trainer.eval_every == 5  # a mapping merges into a section
    assert cfg.rewards.function_kwargs == {"a": 1}  # and replaces a free-form mapping's value
    assert cfg.policy.model_path == ""


def test_interpolations_resolve_and_a_literal_round_trips(tmp_path):
    cfg = load_config(None, ["output_dir=/runs/a", "tracking.run_name=${output_dir}",
                             "rollout.sglang.env.LOG_DIR=${output_dir}/sglang", "data.train_files=[t.jsonl]",
                             "data.eval_files=${data.train_files}", r"data.system_prompt=cost \${x} \\\${x}"])
    assert cfg.tracking.run_name == "/runs/a" and cfg.rollout.sglang.env == {"LOG_DIR": "/runs/a/sglang"}
    assert cfg.data.eval_files == ["t.jsonl"] and cfg.data.system_prompt == r"cost ${x} \${x}"
    assert load_config(save_config(cfg, tmp_path / "resolved.yaml")) == cfg


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="config file .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="config file .* must hold a mapping, got list"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("trainer: {steps: [\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(tmp_path / "broken.yaml")


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load(recipe):
    cfg = load_config(recipe)
    assert cfg.policy.model_path and cfg.data.train_files


def test_a_recipe_builds_on_its_base(tmp_path):
    r2 = load_config(REPO / "recipes" / "qwen3_30b_a3b_grpo_r2.yaml")
    sapo = load_config(REPO / "recipes" / "qwen3_30b_a3b_sapo.yaml")
    assert (r2.policy.routing_replay, r2.loss.loss_type, r2.tracking.experiment) == ("r2", "grpo",
                                                                                      "qwen3_30b_a3b_grpo_r2")
    assert r2.policy.expert_model_parallel_size == sapo.policy.expert_model_parallel_size == 8
    assert r2.data == sapo.data and r2.rollout == sapo.rollout
    r3 = load_config(REPO / "recipes" / "qwen3_30b_a3b_grpo_r3.yaml")
    assert r3.policy.routing_replay == "r3" and "--enable-return-routed-experts" in r3.rollout.sglang.args
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="is its own base"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ValueError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="routing_replay"):
        load_config(None, ["policy.routing_replay=r4"])
