"""Multi-node, rehearsed on one machine, and the SLURM script that launches it for real.

- Two torchrun agents (`--nnodes 2 --nproc_per_node 1`, c10d rendezvous, gloo, loopback only) run the student stage
  of the real `pofa/pretrain.py`: the ranks must hold identical masks and weights after every pruning event, the final
  model must be exactly sparse and equal, bit for bit, to the one-agent two-process run of
  tests/integration/test_distributed_loops.py (same world size, same data shards).
- launch/slurm-multinode.sbatch cannot run here (no SLURM): it runs under stand-in `srun`/`scontrol`/`accelerate`
  commands that record what it would launch on each node.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.test_distributed_loops import (  # noqa: F401  (fixtures: ddp_run, recipe_file)
    assert_exactly_sparse, ddp_run, final_weights, free_port, recipe_file)

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm-multinode.sbatch"
TIMEOUT_S = 240  # the rehearsal takes ~30 s alone; room for a busy 2-core machine

# One rank: pofa/pretrain.py's main, watched. After every pruning event and at the end it records a digest of the
# masks and of the pruned weights as this rank holds them, and what torchrun told it, in OUT/rank{RANK}.json.
RANK_SCRIPT = '''
import hashlib, json, os, sys
from pathlib import Path

from pofa import pretrain

pruners, events = [], []


def digest(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def masks_of(pruner):
    return digest({name: pruner.store[name] for name in pruner.store.names()})


def weights_of(pruner):
    params = dict(pruner.model.named_parameters())
    return digest({name: params[name] for name in pruner.store.names()})


class Watched(pretrain.Pruner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pruners.append(self)

    def prune(self, step, optimizer):
        line = super().prune(step, optimizer)
        events.append({"step": step, "masks": masks_of(self), "weights": weights_of(self)})
        return line


pretrain.Pruner = Watched
code = pretrain.main(sys.argv[2:])
env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                      "GROUP_WORLD_SIZE", "MASTER_ADDR")}
record = {"env": env, "events": events, "masks": masks_of(pruners[0]), "weights": weights_of(pruners[0]),
          "sparsity": pruners[0].store.sparsity()}
(Path(sys.argv[1]) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
sys.exit(code)
'''


def launch_two_agents(recipe: Path, out: Path, work: Path) -> tuple[str, float]:
    """Two torchrun agents, one process each, as two machines would start them; returns their output and the wall
    time. Both are killed (with their workers) if either fails or the pair overruns TIMEOUT_S."""
    script = work / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    # GLOO_SOCKET_IFNAME=lo and --local-addr: every connection (rendezvous store, worker store, gloo) on loopback.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo")
    agents, logs = [], []
    start = time.monotonic()
    try:
        for node in (0, 1):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                       "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                       "--rdzv_id", f"pofa-rehearsal-{port}",
                       "--rdzv_conf", f"is_host={int(node == 0)},join_timeout=60",
                       "--local_addr", "127.0.0.1", "--max_restarts", "0",
                       str(script), str(work), "--recipe", str(recipe), "--output-dir", str(out)]
            log = open(work / f"agent{node}.log", "w+")
            logs.append(log)
            # A session of its own, so that the agent's workers can be killed with it.
            agents.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        deadline = start + TIMEOUT_S
        while any(agent.poll() is None for agent in agents):
            if time.monotonic() > deadline or any(agent.returncode not in (None, 0) for agent in agents):
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - start
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    output = ""
    for node, log in enumerate(logs):
        log.seek(0)
        output += f"--- agent {node} ---\n{log.read()}"
        log.close()
    codes = [agent.returncode for agent in agents]
    assert codes == [0, 0], f"agents exited with {codes} after {elapsed:.0f} s (-9: killed)\n{output[-8000:]}"
    return output, elapsed


@pytest.mark.slow
def test_two_agents_on_one_host_train_as_one_agent_with_two_processes(recipe_file, ddp_run, tmp_path):
    out = tmp_path / "run"
    output, elapsed = launch_two_agents(recipe_file, out, tmp_path)
    print(f"multi-node rehearsal (2 agents x 1 process): {elapsed:.1f} s")
    assert "8 steps x 8 sequences (2 process(es)" in output

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["env"]["GROUP_RANK"] for r in ranks) == ["0", "1"]  # really two machines of one process each
    assert all(r["env"]["LOCAL_WORLD_SIZE"] == "1" and r["env"]["GROUP_WORLD_SIZE"] == "2" for r in ranks)
    assert all(r["env"]["MASTER_ADDR"] == "127.0.0.1" for r in ranks)
    assert [e["step"] for e in ranks[0]["events"]] == [0, 2, 4, 6]
    assert ranks[0]["events"] == ranks[1]["events"], "ranks disagree on masks or weights at a pruning event"
    assert ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["sparsity"] == pytest.approx(0.8, abs=1e-3)

    masks, reference_masks = assert_exactly_sparse(out), assert_exactly_sparse(ddp_run)
    assert masks.names() == reference_masks.names()
    assert all(torch.equal(masks[name], reference_masks[name]) for name in masks.names())
    reference, rehearsed = final_weights(ddp_run), final_weights(out)
    assert reference.keys() == rehearsed.keys()
    differing = [k for k in reference if not torch.equal(reference[k], rehearsed[k])]
    assert not differing, f"two agents and one agent with two processes differ in {differing[:3]}"



# --- SLURM ----------------------------------------------------------------------------------------------------------

SHIMS = {
    # scontrol show hostnames LIST: the hosts, one a line (what the real one prints for node[1-2]).
    "scontrol": 'echo "scontrol $*" >> "$SHIM_LOG"\nprintf "node1\\nnode2\\n"\n',
    # srun: one task per node, each with its SLURM_NODEID, run one after the other.
    "srun": ('echo "srun $*" >> "$SHIM_LOG"\nwhile [ "${1#-}" != "$1" ]; do shift; done\n'
             'node=0\nwhile [ "$node" -lt "$SLURM_NNODES" ]; do\n'
             '  SLURM_NODEID=$node "$@" || exit $?\n  node=$((node + 1))\ndone\n'),
    # accelerate: records its arguments, as JSON, one line per call.
    "accelerate": (f'exec {shlex.quote(sys.executable)} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" '
                   '>> "$SHIM_LOG.accelerate"\n'),
}


def run_sbatch(tmp_path: Path, *args: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in SHIMS.items():
        (shims / name).write_text("#!/bin/sh\n" + body)
        (shims / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE")
           and not k.startswith("SLURM_")}
    env.update(PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", SHIM_LOG=str(log), SLURM_NNODES="2", SLURM_NODEID="0",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="64", **env_extra)
    # From another folder: the script must go to the submit folder itself, as SLURM starts it elsewhere.
    done = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    launched = Path(f"{log}.accelerate")
    calls = [json.loads(line) for line in launched.read_text().splitlines()] if launched.exists() else []
    return done, calls


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_sbatch_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    directives = dict(line.removeprefix("#SBATCH --").split("=", 1) for line in SBATCH.read_text().splitlines()
                      if line.startswith("#SBATCH"))
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "8"


def test_sbatch_script_launches_one_accelerate_per_node_with_its_rank(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from pofa.recipe import PretrainRecipe, load_recipe

    done, calls = run_sbatch(tmp_path, "bert-base-sparse90", "training.per_device_batch_size=16")
    assert done.returncode == 0, done.stdout + done.stderr
    srun = [line for line in (tmp_path / "calls.log").read_text().splitlines() if line.startswith("srun")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0] and "--cpus-per-task=64" in srun[0]
    assert "scontrol show hostnames node[1-2]" in (tmp_path / "calls.log").read_text()

    assert len(calls) == 2, calls
    for node, words in enumerate(calls):
        assert words[0] == "launch"
        assert option(words, "--machine_rank") == str(node)  # each task's own SLURM_NODEID, not the batch node's
        assert option(words, "--main_process_ip") == "node1"  # the first host of the allocation
        assert option(words, "--num_machines") == "2" and option(words, "--num_processes") == "16"
        assert option(words, "--main_process_port") == "29500"
        config = option(words, "--config_file")
        assert config == "launch/multinode-ddp.yaml"
        load_config_from_file(str(REPO / config))
        script = words.index("pofa/pretrain.py")
        assert (REPO / words[script]).is_file()
        assert words[script + 1:] == ["--recipe", "bert-base-sparse90", "training.per_device_batch_size=16"]
        recipe = load_recipe(words[script + 2], words[script + 3:], PretrainRecipe)  # a shipped recipe's name
        assert recipe.training.per_device_batch_size == 16


def test_sbatch_script_takes_the_port_and_gpus_from_the_environment(tmp_path):
    # A recipe given as a file path (relative to the submit directory) passes through as well as a name.
    done, calls = run_sbatch(tmp_path, "pofa/recipes/bert-base-teacher.yaml", MASTER_PORT="29611",
                             SLURM_GPUS_ON_NODE="4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [option(words, "--main_process_port") for words in calls] == ["29611", "29611"]
    assert [option(words, "--num_processes") for words in calls] == ["8", "8"]


@pytest.mark.parametrize("args, message", [((), "usage: sbatch launch/slurm-multinode.sbatch RECIPE"),
                                           (("no-such-recipe",), "no recipe file"),
                                           (("runs/no-such-recipe.yaml",), "no recipe file")])
def test_sbatch_script_refuses_to_start_without_a_recipe(tmp_path, args, message):
    done, calls = run_sbatch(tmp_path, *args)
    assert done.returncode == 2 and message in done.stderr and calls == []


def test_sbatch_commands_in_launch_readme_name_existing_files():
    from pofa.recipe import PretrainRecipe, load_recipe
    from tests.integration.test_readme import readme_commands

    commands = [shlex.split(c) for c in readme_commands(REPO / "launch" / "README.md") if c.startswith("sbatch ")]
    assert commands, "launch/README.md shows no sbatch command"
    for words in commands:
        script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
        assert (REPO / words[script]).is_file(), words[script]
        recipe = REPO / words[script + 1] if (REPO / words[script + 1]).is_file() else words[script + 1]  # or a name
        load_recipe(recipe, words[script + 2:], PretrainRecipe)
