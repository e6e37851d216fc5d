"""Launch a multi-process gloo run the way the distributed tests do."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, cwd, *, nproc=2, timeout=240, env_extra=None):
    """`torchrun --standalone --nproc_per_node=nproc *args` in `cwd`; asserts it exited 0 and returns the process.
    --standalone lets the rendezvous bind a free port itself: a port picked here first could be taken by another
    process before torchrun binds it."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
