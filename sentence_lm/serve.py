"""`transformers serve` for SentenceLM checkpoints: ``python -m sentence_lm.serve MODEL [OPTIONS]``.

It runs transformers' own server, `transformers serve` (its OpenAI-compatible ``/v1/completions``,
``/v1/chat/completions``, ``/v1/responses``, ``/v1/models`` and ``/health``), with the same
arguments and options (``python -m sentence_lm.serve --help`` lists them). The one thing it adds is
where serve's model process finds the model class: it loads a checkpoint with
``getattr(transformers, config.architectures[0])`` (``transformers/cli/serving/model_manager.py``,
``ModelLoader._load_model``), which knows only transformers' own classes, in a process it spawns.
Here the SentenceLM classes are set on that ``transformers`` module, at import of this module, which
the spawned processes import again (``multiprocessing`` re-runs the ``__main__`` module there, as
``__mp_main__``).
"""

from __future__ import annotations

import sys

# The classes `save_pretrained` names in `config.architectures` of a SentenceLM that generates
ARCHITECTURES = ("SentenceLMForCausalLM", "SentenceOPTForCausalLM")


def register() -> None:
    """Set the SentenceLM model classes on the ``transformers`` module serve's model loader reads.

    Importing ``transformers.processing_utils`` (which ``sentence_lm`` does) runs transformers'
    ``__init__`` again and replaces ``sys.modules["transformers"]``; ``model_manager`` keeps the
    module it imported. Both get the classes, after both imports."""
    import transformers

    import sentence_lm
    from transformers.cli.serving import model_manager

    modules = {id(module): module for module in (transformers, sys.modules["transformers"], model_manager.transformers)}
    for name in ARCHITECTURES:
        for module in modules.values():
            setattr(module, name, getattr(sentence_lm, name))


def main(argv: list[str] | None = None) -> None:
    """`transformers serve` with ``argv`` (default: the command line's arguments).

    ``--continuous-batching`` (and its ``--cb-*`` settings) is refused: it runs the model's
    ``forward`` one token at a time over a paged KV cache, and a SentenceLM's cache is over
    sentences and lives in its ``generate()``, which serve calls otherwise."""
    from transformers.cli.transformers import app

    argv = list(sys.argv[1:] if argv is None else argv)
    batching = [arg for arg in argv if arg.split("=")[0] == "--continuous-batching" or arg.startswith("--cb-")]
    if batching:
        raise SystemExit(
            f"sentence_lm.serve: {batching[0]} is not supported: continuous batching runs the model's forward one "
            "token at a time over a paged KV cache, and a SentenceLM decodes in its own generate(), which serve "
            "runs without that option."
        )
    app(args=["serve", *argv], prog_name="transformers")


register()  # at import: in this process, and in each process serve spawns (see the module's docstring)

if __name__ == "__main__":
    main()
