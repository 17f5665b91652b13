"""scripts/env.sh, which scripts/test.sh and scripts/bench.sh source, run against a fake venv: a `pip` that
records its calls and a `python` that sees stub packages. It installs fused_lora once and again only
when pyproject.toml changes, and picks torch's CPU build on a machine without an NVIDIA GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PIP = """#!/bin/sh
echo "$*" >> "{log}"
case "$*" in *" -e "*)
  mkdir -p "{site}/fused_lora-0.1.0.dist-info"
  printf 'Metadata-Version: 2.1\\nName: fused_lora\\nVersion: 0.1.0\\n' > "{site}/fused_lora-0.1.0.dist-info/METADATA"
esac
"""


@pytest.fixture
def fake(tmp_path):
    """A copy of env.sh and pyproject.toml beside a .venv whose python is this one with a stub site folder."""
    if shutil.which("bash") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs bash and sha256sum")
    repo, site = tmp_path / "repo", tmp_path / "site"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "env.sh", repo / "scripts" / "env.sh")
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("torch", "triton"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
    scripts = {
        "python": f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" -S "$@"\n',
        "pip": PIP.format(log=tmp_path / "pip.log", site=site),
        "nvidia-smi": "#!/bin/sh\nexit 1\n",  # no GPU, whatever the machine has
        "activate": f'export PATH="{bin_dir}:$PATH"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(**env) -> list[str]:
        """Source env.sh once; the pip calls it made."""
        log = tmp_path / "pip.log"
        log.unlink(missing_ok=True)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_LORA_")}
        proc = subprocess.run(["bash", "-c", "source scripts/env.sh"], cwd=repo, env={**environ, **env},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return log.read_text().splitlines() if log.exists() else []

    run.repo, run.site = repo, site
    return run


def test_env_installs_the_package_once_and_again_when_pyproject_changes(fake):
    assert fake() == ["install -q -e .[test,bench,integrations]"]
    assert fake() == [], "nothing changed: no reinstall (it took 7 s on every script call)"
    with (fake.repo / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency, say\n")
    assert fake() == ["install -q -e .[test,bench,integrations]"]
    assert fake() == []
    assert fake(FUSED_LORA_REINSTALL="1") == ["install -q -e .[test,bench,integrations]"]
    shutil.rmtree(fake.site / "fused_lora-0.1.0.dist-info")  # uninstalled behind the stamp's back
    assert fake() == ["install -q -e .[test,bench,integrations]"]


def test_env_installs_the_cpu_torch_without_a_gpu_and_pypis_with_one(fake):
    shutil.rmtree(fake.site / "torch")
    calls = fake()
    assert calls[0] == "install -q torch==2.13.0+cpu", calls  # the local wheel, or PyTorch's CPU index next
    (fake.repo / ".venv" / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    assert fake()[0] == "install -q torch==2.13.0"  # PyPI's build is the CUDA one
    index = "https://download.pytorch.org/whl/cu130"
    assert fake(FUSED_LORA_TORCH_INDEX=index)[0] == f"install -q torch==2.13.0 --index-url {index}"
