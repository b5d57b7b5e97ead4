"""The distribution: a built wheel installs into a fresh virtual env and carries
dfpgen, dfpgen.runtime and the IR templates; the editable install finds them too."""
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPO_TEMPLATES = sorted(p.name for p in (ROOT / "templates").glob("*.ll.j2"))


def test_editable_install_finds_templates():
    from dfpgen.render import template_names
    assert REPO_TEMPLATES, "templates/ holds no *.ll.j2"
    assert template_names() == REPO_TEMPLATES


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(ROOT)], check=True, capture_output=True, text=True)
    wheels = list(dist.glob("dfpgen-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies (torch, llvmlite, ...) come from this environment's site-packages through a
    # .pth file rather than a second multi-GB install; dfpgen itself only from the wheel.
    deps = sysconfig.get_paths()["purelib"]
    Path(site, "zz_deps.pth").write_text(deps + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
                   check=True, capture_output=True, text=True)
    probe = (
        "import dfpgen, dfpgen.runtime, dfpgen.templates, os\n"
        "from dfpgen.render import template_names\n"
        "print(os.path.dirname(dfpgen.__file__))\n"
        "print(os.path.dirname(dfpgen.runtime.__file__))\n"
        "print(','.join(template_names()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout.splitlines()
    assert out[0].startswith(site) and out[0].endswith("dfpgen")
    assert out[1] == os.path.join(out[0], "runtime")
    assert out[2].split(",") == REPO_TEMPLATES
