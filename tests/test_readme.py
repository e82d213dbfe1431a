import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert tuple(namespace["out"].shape) == (2, 10, 64)
    weights_before = [p.detach().clone() for p in namespace["net"].router.parameters()]
    assert weights_before, "the example should route (DAR mode has parameters)"


def test_readme_documents_every_cli_command():
    from dar.cli import build_parser

    text = README.read_text()
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"dar {name} " in text, f"README has no example of `dar {name}`"
