"""Named experiment and sweep definitions shipped with ntk-sweep (YAML files in this folder)."""

from pathlib import Path

FOLDER = Path(__file__).parent


def resolve(name_or_path: str) -> Path:
    """A YAML path as given, or the shipped file ``<name>.yaml`` in this folder."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return FOLDER / f"{name_or_path}.yaml"


def names() -> list[str]:
    """Names of the shipped definitions."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))
