"""The recipes and launch configs that ship with imret: one copy, the repository's top-level `recipes/` and
`launch/`, which a wheel carries inside the package (imret/recipes, imret/launch). `imret recipe list` names them
and `imret recipe copy` puts them where a user edits them, laid out as the study recipes' relative paths expect
(`DEST/recipes/*.yaml`, `DEST/recipes/demo/*.yaml`, `DEST/launch/*.yaml`); `imret demo` reads its own from here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from imret.errors import ImretError, did_you_mean


def shipped_root() -> Path:
    """The folder holding `recipes/` and `launch/`: the installed package (from a wheel), or the source checkout
    (an editable install, or running from the checkout)."""
    package = Path(__file__).resolve().parent
    for root in (package, package.parent):
        if (root / "recipes" / "demo" / "study.yaml").is_file():
            return root
    raise ImretError(f"imret's recipes are neither in {package / 'recipes'} nor beside it: reinstall imret")


def shipped_files() -> dict[str, Path]:
    """name -> file: `finetune`, `demo/study`, `launch/multi-gpu`, ..."""
    root = shipped_root()
    found = {}
    for path in sorted((root / "recipes").rglob("*.yaml")):
        found[path.relative_to(root / "recipes").with_suffix("").as_posix()] = path
    for path in sorted((root / "launch").glob("*.yaml")):
        found[f"launch/{path.stem}"] = path
    return found


def destination(name: str, dest: Path) -> Path:
    """Where `copy` puts a shipped file under DEST: recipes under DEST/recipes/, launch configs under DEST/launch/."""
    return dest / (f"{name}.yaml" if name.startswith("launch/") else f"recipes/{name}.yaml")


def describe(path: Path) -> str:
    """A recipe's first sentence, from the comment block it opens with: what it trains."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines).split(". ")[0].removesuffix(".")


def list_shipped() -> list[tuple[str, str]]:
    return [(name, describe(path)) for name, path in shipped_files().items()]


def copy_shipped(name: str, dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy one shipped file (`finetune`, `demo/study`, `launch/cpu`) or `all` under DEST; a file already there is
    kept (a user's edits are never lost) unless `overwrite`. Returns the files written."""
    files = shipped_files()
    name = name.removesuffix(".yaml").removeprefix("recipes/")
    if name != "all" and name not in files:
        raise ImretError(f"no shipped recipe '{name}'{did_you_mean(name, files)}: imret recipe list names them")
    chosen = files if name == "all" else {name: files[name]}
    dest = Path(dest)
    targets = {destination(n, dest): path for n, path in chosen.items()}
    existing = [str(target) for target in targets if target.exists()]
    if existing and not overwrite:
        raise ImretError(f"{existing[0]}{f' and {len(existing) - 1} more' if len(existing) > 1 else ''} already "
                         f"exist: pass --overwrite to replace them")  # fmt: skip
    for target, path in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return list(targets)
