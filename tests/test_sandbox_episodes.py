"""The Python sandbox environment against hostile episodes: concurrent episodes cannot affect each other, tool calls
and scoring never raise and keep their deadline, a failing sandbox scores NaN, a host without bubblewrap is refused,
and a real training run with a hostile scripted policy completes and scores every episode."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from conftest import ScriptedPolicy

from envs import python_sandbox, sandbox
from envs.python_sandbox import PythonSandboxEnv

# A daemon (started through _posixsubprocess, in a session of its own) that for 3 s, during its run and after it,
# tries to overwrite every output another run could produce.
FORGER = """
import os, sys
from multiprocessing.util import spawnv_passfds
daemon = '''
import glob, os, time
os.setsid()
end = time.time() + 3
while time.time() < end:
    for path in glob.glob('/tmp/rlfw-sandbox-*/.std*') + glob.glob('/tmp/*') + glob.glob('/proc/[0-9]*/fd/[12]'):
        try:
            with open(path, 'w') as f:
                f.write('FORGED')
        except OSError:
            pass
    time.sleep(0.05)
'''
spawnv_passfds(os.fsencode(sys.executable), [sys.executable, '-c', daemon], [])
for name in ('.stdout', '.stderr'):
    try:
        os.symlink('/proc/self/environ', name)
    except OSError:
        pass
import time
time.sleep(2)  # the daemon forges while the other episodes run
print('forger started')
"""

# A final answer that is wrong and hostile: forks a flooding daemon, plants a FIFO, then defines the function wrongly.
HOSTILE_ANSWER = """
import os
os.mkfifo('.stdout')
if os.fork() == 0:
    os.setsid()
    while True:
        print('x' * 1000)
def f(*args, **kwargs):
    return None
"""

HOSTILE_TOOL_CALLS = [
    FORGER,
    "import os\nos.mkfifo('.stdout')\nos.mkfifo('.stderr')\nimport time\ntime.sleep(60)",
    "while True:\n    print('y' * 4096)",
    "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "import sys\nsys.exit(256)",
    "import os\nwhile True:\n    os.fork()",
    "import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass",
]
TOOL_DEADLINE_S = python_sandbox.TOOL_LIMITS.wall_seconds + 4
REWARD_DEADLINE_S = python_sandbox.TEST_LIMITS.wall_seconds + 4


def new_episode(row) -> PythonSandboxEnv:
    env = PythonSandboxEnv()
    env.reset(**row)
    return env


def answer_episode(env: PythonSandboxEnv, code: str) -> float:
    env.final_text = f"<answer>{code}</answer>"  # what the engine records for the final message
    return env.get_reward()


def test_eight_concurrent_hostile_episodes_cannot_affect_each_other():
    rows = list(python_sandbox.build_dataset(8))
    outputs: dict[int, list[str]] = {}
    rewards: dict[int, float] = {}

    def episode(i: int) -> None:
        env = new_episode(rows[i])
        if i % 2 == 0:  # hostile: a forging daemon as tool call, a hostile wrong answer
            outputs[i] = [env.run_python(FORGER)]
            rewards[i] = answer_episode(env, HOSTILE_ANSWER)
        else:  # honest: its outputs must be exactly its own, while the forgers run
            outputs[i] = []
            for k in range(4):
                outputs[i].append(env.run_python(f"print('episode {i} call {k}')"))
                time.sleep(0.3)
            rewards[i] = answer_episode(env, rows[i]["answer"])

    threads = [threading.Thread(target=episode, args=(i,)) for i in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - start < 90
    for i in range(8):
        if i % 2:  # exactly its own output and score: nothing of the forgers reached it
            for k, out in enumerate(outputs[i]):
                # On an overloaded machine a call may also reach its wall clock; its output is still its own.
                assert out in (f"episode {i} call {k}", f"episode {i} call {k}\n[stopped: timeout]"), (i, outputs[i])
            assert rewards[i] == 1.0
        else:  # a forger may spoil its own output (or, on an overloaded machine, reach its wall clock)
            assert outputs[i][0].startswith(("forger started", "[stopped: timeout]")), outputs[i]
            assert rewards[i] == 0.0


@pytest.mark.parametrize("code", HOSTILE_TOOL_CALLS, ids=range(len(HOSTILE_TOOL_CALLS)))
def test_tool_calls_and_scoring_never_raise_and_keep_their_deadline(code):
    env = new_episode(python_sandbox.build_dataset(1)[0])
    start = time.monotonic()
    observation = env.run_python(code)
    assert isinstance(observation, str) and time.monotonic() - start < TOOL_DEADLINE_S
    start = time.monotonic()
    reward = answer_episode(env, code)
    assert time.monotonic() - start < REWARD_DEADLINE_S
    assert reward == 0.0 or math.isnan(reward)
    turn = env._score_turn(env.tool_events)
    assert turn == 0.0 or (code == FORGER and turn == 1.0)


def test_a_failing_sandbox_gives_an_error_observation_and_an_unscorable_reward(monkeypatch):
    env = new_episode(python_sandbox.build_dataset(1)[0])

    def broken(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(sandbox, "_run_bwrap", broken)
    result = sandbox.run_code("print(1)")
    assert result.error and "Too many open files" in result.error and not result.ok
    assert env.run_python("print(1)").startswith("[sandbox error:")
    assert math.isnan(answer_episode(env, python_sandbox.build_dataset(1)[0]["answer"]))
    assert math.isnan(env._score_turn(env.tool_events))


@pytest.fixture
def fresh_probe():
    sandbox._find_backend.cache_clear()
    yield
    sandbox._find_backend.cache_clear()


def test_missing_bubblewrap_refuses_to_start_naming_the_fix(monkeypatch, fresh_probe):
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        PythonSandboxEnv()


def test_no_user_namespaces_refuses_to_start_naming_the_fix(monkeypatch, fresh_probe):
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_probe", lambda backend: "bwrap: No permissions to create new namespace")
    with pytest.raises(sandbox.SandboxUnavailable, match="unprivileged_userns_clone") as err:
        sandbox.check_sandbox()
    assert "No permissions to create new namespace" in str(err.value)


def test_unsafe_opt_in_is_explicit_and_loud(monkeypatch, fresh_probe, capfd):
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox"):
        backend = sandbox.check_sandbox()
    assert backend.bwrap is None and "unsandboxed" in capfd.readouterr().err
    result = sandbox.run_code("import sys\nprint(sys.stdin.read())", stdin="hi")
    assert result.ok and result.stdout == "hi\n"


# ---- a real training run with a hostile scripted policy ----

class RecordedSandboxEnv(PythonSandboxEnv):
    episodes: list[PythonSandboxEnv] = []

    def reset(self, **row):
        RecordedSandboxEnv.episodes.append(self)
        return super().reset(**row)


class HostilePolicy(ScriptedPolicy):
    """First turn: a forging, FIFO-planting run_python call; then a hostile, wrong final answer."""

    def __init__(self, trainer):
        call = {"name": "run_python", "arguments": {"code": FORGER}}
        super().__init__(trainer, f"<call>{json.dumps(call)}</call><|end|>")

    def generate(self, prompts, max_new_tokens):
        out = []
        for ids, budget in zip(prompts, max_new_tokens, strict=True):
            first = ids.count(self.assistant_id) == 1
            text = self.first if first else f"<answer>{HOSTILE_ANSWER}</answer><|end|>"
            new = self.tokenizer.encode(text, add_special_tokens=False)[:budget]
            out.append((new, [-1.0] * len(new)))
        return out


def test_training_with_a_hostile_policy_completes_and_scores_every_episode(tmp_path, tiny_assets, tokenizer,
                                                                           make_config):
    from rlfw.trainer import RLTrainer

    RecordedSandboxEnv.episodes = []
    args = make_config(max_steps=2, max_turns=3, max_completion_length=2048, reward_errors="raise")
    trainer = RLTrainer(model=tiny_assets, args=args, train_dataset=python_sandbox.build_dataset(16),
                        processing_class=tokenizer, environment_factory=RecordedSandboxEnv,
                        rollout_backend=HostilePolicy)
    trainer.train()
    episodes = RecordedSandboxEnv.episodes
    assert len(episodes) == args.max_steps * args.per_device_train_batch_size, "an episode was lost"
    for env in episodes:
        assert [(e["tool"], e["ok"]) for e in env.tool_events] == [("run_python", True)]
        assert env.final_text and "def f" in env.final_text
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == args.max_steps
    assert all(entry["reward"] == 0.0 for entry in logged), logged
