"""The README's two-machine command, run as two torchrun agents ("machines") on this host.

Each agent is what a user starts on one machine: `torchrun --nnodes 2 --nproc-per-node 1
--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID -m llmclock train ...`. They meet
through the c10d rendezvous hosted by the first, exactly as on two machines; only the address is
loopback. The two-rank job must give the losses of one process with the same global batch.
"""

import subprocess
import sys

import pytest

from test_distributed import ARGS, ENV, _free_port, _losses, _one_process, _state


@pytest.mark.slow
def test_two_agents_rendezvous_like_two_machines(tmp_path, data_dir):
    _one_process(data_dir, tmp_path / "one", steps=4, grad_accum=2)
    port = _free_port()
    out = tmp_path / "two"

    def agent() -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "llmclock-test",
               "--rdzv-conf", "last_call_timeout=1", "-m", "llmclock", "train", "--data", str(data_dir),
               "--out", str(out), "--steps", "4", "--dist-timeout", "60", *ARGS]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    # Whichever agent binds the endpoint's port first hosts the store, as on two machines.
    agents = [agent(), agent()]
    try:
        results = [a.communicate(timeout=240) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for a, (_, err) in zip(agents, results):
        assert a.returncode == 0, err[-3000:]
    st = _state(out)
    assert st["world"] == 2 and st["step"] == 4 and st["tokens_seen"] == 4 * 2 * 2 * 16
    assert _losses(out) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
