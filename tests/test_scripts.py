"""scripts/env.sh (which scripts/test.sh and scripts/bench.sh source) and scripts/test.sh, run against a
fake venv: a `pip` that records its calls, a `python` that sees stub packages and answers `-m pytest`
with a chosen exit code. env.sh installs fused_lora once and again only when pyproject.toml changes, and
picks torch's CPU build without an NVIDIA GPU; test.sh runs the compile tests under a second Triton
after the main suite, says which run failed, and skips that step on request."""

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
case "$*" in *" --target "*)  # pip install -q --no-deps --target DIR triton==V
  dir=$(echo "$*" | sed 's/.*--target \\([^ ]*\\) .*/\\1/'); version=${{*##*==}}
  mkdir -p "$dir/triton" && echo "__version__ = '$version'" > "$dir/triton/__init__.py"
esac
"""

PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
  echo "pytest PYTHONPATH=${{PYTHONPATH:-}} EXPECT=${{FUSED_LORA_EXPECT_TRITON:-}} $*" >> "{log}"
  case "$*" in *test_compile.py*) exit ${{FAKE_COMPILE_RC:-0}} ;; esac
  exit ${{FAKE_MAIN_RC:-0}}
fi
PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" exec "{python}" -S "$@"
"""


@pytest.fixture
def fake(tmp_path):
    """A copy of env.sh and pyproject.toml beside a .venv whose python is this one with a stub site folder."""
    if shutil.which("bash") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs bash and sha256sum")
    repo, site = tmp_path / "repo", tmp_path / "site"
    (repo / "scripts").mkdir(parents=True)
    for name in ("env.sh", "test.sh"):
        shutil.copy(REPO / "scripts" / name, repo / "scripts" / name)
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("torch", "triton"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
    scripts = {
        "python": PYTHON.format(log=tmp_path / "pip.log", site=site, python=sys.executable),
        "pip": PIP.format(log=tmp_path / "pip.log", site=site),
        "nvidia-smi": "#!/bin/sh\nexit 1\n",  # no GPU, whatever the machine has
        "activate": f'export PATH="{bin_dir}:$PATH"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(*args: str, script: str = "source scripts/env.sh", rc: int = 0, **env) -> list[str]:
        """Run a script once (env.sh by default); the pip and pytest calls it made. run.out: its output."""
        log = tmp_path / "pip.log"
        log.unlink(missing_ok=True)
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("FUSED_LORA_", "PYTHONPATH"))}
        proc = subprocess.run(["bash", "-c", f"{script} {' '.join(args)}"], cwd=repo, env={**environ, **env},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == rc, proc.stdout + proc.stderr
        run.out = proc.stdout
        return log.read_text().splitlines() if log.exists() else []

    run.repo, run.site = repo, site
    return run


def test_env_installs_the_package_once_and_again_when_pyproject_changes(fake):
    assert fake() == ["install -q -e .[test,bench,integrations,qlora]"]
    assert fake() == [], "nothing changed: no reinstall (it took 7 s on every script call)"
    with (fake.repo / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency, say\n")
    assert fake() == ["install -q -e .[test,bench,integrations,qlora]"]
    assert fake() == []
    assert fake(FUSED_LORA_REINSTALL="1") == ["install -q -e .[test,bench,integrations,qlora]"]
    shutil.rmtree(fake.site / "fused_lora-0.1.0.dist-info")  # uninstalled behind the stamp's back
    assert fake() == ["install -q -e .[test,bench,integrations,qlora]"]


def test_env_installs_the_cpu_torch_without_a_gpu_and_pypis_with_one(fake):
    shutil.rmtree(fake.site / "torch")
    calls = fake()
    assert calls[0] == "install -q torch==2.13.0+cpu", calls  # the local wheel, or PyTorch's CPU index next
    (fake.repo / ".venv" / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    assert fake()[0] == "install -q torch==2.13.0"  # PyPI's build is the CUDA one
    index = "https://download.pytorch.org/whl/cu130"
    assert fake(FUSED_LORA_TORCH_INDEX=index)[0] == f"install -q torch==2.13.0 --index-url {index}"


def test_a_full_test_run_compiles_again_under_the_second_triton_after_the_suite(fake):
    fake()  # install
    calls = fake(script="bash scripts/test.sh")
    target = ".venv/tritons/3.8.0"
    assert calls == [
        "pytest PYTHONPATH= EXPECT= -m pytest -n auto",
        f"install -q --no-deps --target {target} triton==3.8.0",
        f"pytest PYTHONPATH={target} EXPECT=3.8.0 -m pytest tests/test_compile.py -n 0 -q -p no:cacheprovider",
    ], "the second compile run comes after the main one, under that Triton only"
    assert fake.out.splitlines()[-3:] == ["=== summary ===", "tests (triton ?): passed",
                                          "compile check, triton 3.8.0: passed"]  # fmt: skip
    assert [c.split()[0] for c in fake(script="bash scripts/test.sh")] == ["pytest", "pytest"], "installed once"


def test_a_failure_of_either_run_fails_the_script_and_is_named(fake):
    fake()
    fake(script="bash scripts/test.sh", rc=1, FAKE_COMPILE_RC="1")
    assert "tests (triton ?): passed" in fake.out
    assert "compile check, triton 3.8.0: FAILED (pytest exit code 1; log .venv/tritons/3.8.0.log;" in fake.out
    calls = fake(script="bash scripts/test.sh", rc=1, FAKE_MAIN_RC="1")
    assert len(calls) == 2, "the compile check still runs when the suite failed"
    assert "tests (triton ?): FAILED (pytest exit code 1" in fake.out and "triton 3.8.0: passed" in fake.out


def test_the_second_compile_run_is_skipped_on_request_or_for_a_partial_run(fake):
    fake()
    assert fake(script="bash scripts/test.sh", FUSED_LORA_CHECK_TRITON="none") == [
        "pytest PYTHONPATH= EXPECT= -m pytest -n auto"
    ]
    assert fake("tests/test_layer.py", "-x", script="bash scripts/test.sh") == [
        "pytest PYTHONPATH= EXPECT= -m pytest -n auto tests/test_layer.py -x"
    ]
    calls = fake("tests/test_layer.py", script="bash scripts/test.sh", FUSED_LORA_CHECK_TRITON="3.8.0 3.9.0")
    assert [c.split()[1] for c in calls if c.startswith("pytest")] == [
        "PYTHONPATH=",
        "PYTHONPATH=.venv/tritons/3.8.0",
        "PYTHONPATH=.venv/tritons/3.9.0",
    ]
