"""Self-contained remote code for saved DSLA models, so a folder or Hub repo loads with `trust_remote_code=True`
where `dsla_hf` is not installed.

Transformers' own exporter copies a model file and its flat, same-folder relative imports; our kernels live in a
sub-package, so we write the flat layout ourselves: the kernels' `__init__` becomes `dsla_kernels.py` beside the
modeling file and the PyTorch kernel modules it imports. The same code works from that flat layout (a model loaded
as remote code saves itself again). The Triton kernels are among them (imported lazily, where Triton is installed);
the C++ CPU kernels stay with the installed package.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

MODEL_FILES = ("configuration_dsla.py", "cache_dsla.py", "modeling_dsla.py", "remote_code.py")
KERNELS_MODULE = "dsla_kernels"
AUTO_MAP = {
    "AutoConfig": "configuration_dsla.DSLAConfig",
    "AutoModel": "modeling_dsla.DSLALlamaModel",
    "AutoModelForCausalLM": "modeling_dsla.DSLALlamaForCausalLM",
}
_RELATIVE = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)


def _kernel_sources() -> tuple[Path, str]:
    """Folder of the kernel modules and the file name of their public API."""
    here = Path(__file__).parent
    if (here / f"{KERNELS_MODULE}.py").is_file():  # the flat layout of a saved folder
        return here, f"{KERNELS_MODULE}.py"
    package = importlib.import_module("...kernels", __package__)  # dsla_hf.kernels
    return Path(package.__file__).parent, "__init__.py"


def remote_code_files() -> dict[str, str]:
    """File name -> source text of every file a saved model folder needs."""
    here = Path(__file__).parent
    files = {name: (here / name).read_text() for name in MODEL_FILES}
    files["modeling_dsla.py"] = files["modeling_dsla.py"].replace(
        "from ...kernels import", f"from .{KERNELS_MODULE} import"
    )
    kernel_dir, api_file = _kernel_sources()
    pending = [(f"{KERNELS_MODULE}.py", kernel_dir / api_file)]
    while pending:
        name, path = pending.pop()
        if name in files:
            continue
        text = path.read_text()
        files[name] = text
        pending += [(f"{dep}.py", kernel_dir / f"{dep}.py") for dep in _RELATIVE.findall(text)]
    return files


def write_remote_code(folder: str | Path) -> list[str]:
    folder = Path(folder)
    written = []
    for name, text in remote_code_files().items():
        (folder / name).write_text(text)
        written.append(name)
    return written
