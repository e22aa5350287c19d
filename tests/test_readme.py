"""The README's Python examples run (those that need no download)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    offline = [b for b in blocks if "from_pretrained(\"you/" not in b and "push_to_hub" not in b]
    assert len(offline) >= 3
    namespace: dict = {}
    for block in offline:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["generated"].shape[0] == 2
