"""Safe checkpoints for ``sentence_lm`` models (and tokenizers).

:class:`SafeCheckpointMixin` goes first in the bases of a ``PreTrainedModel`` (or tokenizer)
class and changes two things:

* ``save_pretrained`` is **atomic**, and includes what the class's ``_save_extras(directory)``
  writes, when it has one (a tokenizer, a model card): everything is written into a fresh hidden sibling
  directory, which then replaces the target directory (old one renamed to a backup, new one
  renamed into place, backup deleted). An exception, a full disk or a kill in the middle of
  writing leaves the previous checkpoint in that directory as it was. Files of the old
  directory that the new save does not write (a tokenizer saved there before, training state,
  sub-directories) are carried over, as hard links where possible; stale weight files of the
  old checkpoint (an old ``model.safetensors`` when the new save is sharded, old shards...) are
  not. ``push_to_hub=True`` and the code copying of ``register_for_auto_class`` still work:
  they run inside the wrapped ``save_pretrained``.
* ``from_pretrained`` (models only) **checks the checkpoint before loading**: it must have a
  ``config.json`` whose ``model_type`` is the class's, its weights must be safetensors (a
  ``pytorch_model.bin`` is never unpickled: ``use_safetensors=True``), and every safetensors
  file must be complete (its header is read and its size checked). Works for local
  directories and for repo ids (resolved through the Hugging Face cache, offline included).

This module travels with checkpoints (``transformers`` copies the modules a model file imports
relatively), so it imports only the standard library and ``transformers``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import uuid

import huggingface_hub
import transformers
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import cached_file

__all__ = ["SafeCheckpointMixin", "atomic_save", "check_safetensors_file", "upload_checkpoint"]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Weight files of a checkpoint, by family: (kind, variant). A new save supersedes the old
# files of the families it writes.
_WEIGHT_FILE = re.compile(
    r"^(?P<base>model|pytorch_model|adapter_model)(?P<variant>\.\w+)?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)$"
)
_INDEX_FILE = re.compile(r"^(?P<base>model|pytorch_model|adapter_model)\.(?:safetensors|bin)\.index(?P<variant>\.\w+)?\.json$")

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _add_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.<variant>.safetensors`` (as ``transformers`` names them)."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def _weight_family(name: str) -> tuple[str, str] | None:
    match = _WEIGHT_FILE.match(name) or _INDEX_FILE.match(name)
    if match is None:
        return None
    kind = "adapter" if match["base"] == "adapter_model" else "model"
    return kind, match["variant"] or ""


# --------------------------------------------------------------------------------- atomic save
def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _carry_over(old_dir: str, new_dir: str) -> None:
    """Bring the entries of ``old_dir`` that the new save did not write into ``new_dir``,
    except weight files superseded by the new ones."""
    new_entries = set(os.listdir(new_dir))
    new_families = {_weight_family(name) for name in new_entries} - {None}
    for name in os.listdir(old_dir):
        if name in new_entries or _weight_family(name) in new_families:
            continue
        src, dst = os.path.join(old_dir, name), os.path.join(new_dir, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _swap_into_place(new_dir: str, target: str) -> None:
    """Replace ``target`` by ``new_dir`` with two renames; on failure ``target`` is restored."""
    if not os.path.lexists(target):
        os.rename(new_dir, target)
        return
    parent, base = os.path.split(target)
    backup = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
    os.rename(target, backup)
    try:
        os.rename(new_dir, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def atomic_save(save, save_directory: str | os.PathLike):
    """Call ``save(tmp_dir)`` on a fresh hidden sibling of ``save_directory``, then swap it in.

    If ``save`` raises (or the process dies) the previous content of ``save_directory`` is left
    untouched; the partial directory is removed (after a kill, a hidden ``.NAME.saving-*``
    sibling may remain and can be deleted). Entries of the old directory that the save did
    not write are carried over (hard links where possible), except superseded weight files.
    Returns what ``save`` returned, with paths inside the temporary directory rewritten to
    ``save_directory``.
    """
    target = os.path.realpath(os.fspath(save_directory))
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.saving-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)  # default permissions (umask), unlike tempfile.mkdtemp's 0o700
    try:
        result = save(tmp)
        if os.path.isdir(target):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            _carry_over(target, tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _rewrite_paths(result, tmp, target)


def _rewrite_paths(value, old: str, new: str):
    if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
        return new + value[len(old) :]
    if isinstance(value, (tuple, list)):
        return type(value)(_rewrite_paths(v, old, new) for v in value)
    return value


# --------------------------------------------------------------------------------- checks
def check_safetensors_file(path: str) -> None:
    """Raise ``OSError`` naming ``path`` unless it is a complete safetensors file: an 8-byte
    header length, a JSON header, and tensor data that exactly covers the rest of the file."""
    hint = "The file is truncated or corrupt: re-download it (e.g. `force_download=True`) or re-save the checkpoint."
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"it is only {size} bytes long")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"its header claims {header_len} bytes but the file has only {size} bytes")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        spans = sorted(
            tuple(entry["data_offsets"]) for key, entry in header.items() if key != "__metadata__"
        )
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise OSError(f"Cannot read the safetensors file {path}: {err}. {hint}") from err
    data_len, covered = size - 8 - header_len, 0
    for begin, end in spans:
        if begin != covered or end < begin:
            raise OSError(f"Cannot read the safetensors file {path}: its tensor data is not contiguous. {hint}")
        covered = end
    if covered != data_len:
        raise OSError(
            f"Cannot read the safetensors file {path}: its header describes {covered} bytes of tensor data "
            f"but the file holds {data_len}. {hint}"
        )


def _resolve(path_or_repo: str, filename: str, hub_kwargs: dict) -> str | None:
    """Local path or cached/downloaded file of ``filename`` in the checkpoint, or ``None``."""
    return cached_file(
        path_or_repo,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_gated_repo=False,
        **hub_kwargs,
    )


def _class_for(model_type: str | None, architectures) -> str:
    known = {
        "sentence_vae": "`sentence_lm.SentenceVAEModel` (or `AutoModel`)",
        "sentence_opt": "`sentence_lm.SentenceOPTForCausalLM` (or `AutoModelForCausalLM`)",
        "sentence_lm": "`sentence_lm.SentenceLMForCausalLM` (or `AutoModelForCausalLM`)",
    }
    if model_type in known:
        return known[model_type]
    if architectures and isinstance(architectures, list) and hasattr(transformers, str(architectures[0])):
        return f"`transformers.{architectures[0]}` (or the matching Auto class)"
    return "the matching `transformers` Auto class (e.g. `AutoModel`)"


def check_model_type(cls, source: str, model_type, architectures=None) -> None:
    """Raise ``ValueError`` unless ``model_type`` is the one ``cls`` loads."""
    expected = cls.config_class.model_type
    if model_type != expected:
        raise ValueError(
            f"{source} is a {model_type!r} checkpoint, but {cls.__name__} loads {expected!r} checkpoints. "
            f"Load it with {_class_for(model_type, architectures)}.from_pretrained(...) instead."
        )


def _interrupted_save_backups(path: str) -> list[str]:
    """Backups left by an atomic save killed between its two renames (see :func:`atomic_save`)."""
    parent, base = os.path.split(os.path.abspath(path))
    if not base or os.path.exists(path) or not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(f".{base}.old-"))


def check_checkpoint(cls, pretrained_model_name_or_path, kwargs: dict) -> list[str]:
    """Check a checkpoint before ``cls.from_pretrained`` loads it; return its weight files.

    When ``cls.legacy_key_mapping(saved_config)`` (if the class has one) says the checkpoint's
    weights have older names, the renaming is added to ``kwargs`` as ``key_mapping``."""
    path = os.fspath(pretrained_model_name_or_path)
    backups = _interrupted_save_backups(path)
    if backups:
        raise OSError(
            f"{path} does not exist, but a save into it was interrupted: the previous checkpoint is in "
            f"{backups[-1]}. Rename it back to {path} (or save again)."
        )
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
    where = os.path.join(path, hub_kwargs["subfolder"]) if hub_kwargs.get("subfolder") else path

    config_file = _resolve(path, CONFIG_NAME, hub_kwargs)
    config = kwargs.get("config")
    if config_file is not None:
        try:
            with open(config_file, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            raise OSError(f"Cannot read {config_file}: {err}. Re-download or re-save the checkpoint.") from err
        check_model_type(cls, where, saved.get("model_type"), saved.get("architectures"))
        mapping = getattr(cls, "legacy_key_mapping", lambda saved: None)(saved)
        if mapping is not None:
            kwargs.setdefault("key_mapping", mapping)
    elif not isinstance(config, PreTrainedConfig):
        raise OSError(
            f"{where} has no {CONFIG_NAME}; it is not a {cls.config_class.model_type!r} checkpoint "
            f"saved with `{cls.__name__}.save_pretrained`."
        )
    if isinstance(config, PreTrainedConfig):
        check_model_type(cls, "The `config` passed", config.model_type)

    if kwargs.get("state_dict") is not None:
        return []
    variant = kwargs.get("variant")
    weights = _resolve(path, _add_variant(SAFE_WEIGHTS_NAME, variant), hub_kwargs)
    if weights is not None:
        files = [weights]
    else:
        index = _resolve(path, _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant), hub_kwargs)
        if index is None:
            pickled = [n for n in PICKLE_WEIGHTS_NAMES if _resolve(path, _add_variant(n, variant), hub_kwargs)]
            if pickled:
                raise OSError(
                    f"{where} holds only pickled PyTorch weights ({pickled[0]}); {cls.__name__} loads "
                    "safetensors only and never unpickles files. Convert them to safetensors (load them "
                    "yourself if you trust the file, then `save_pretrained`)."
                )
            raise OSError(
                f"{where} has no weights: {_add_variant(SAFE_WEIGHTS_NAME, variant)} is missing. Re-save the "
                f"checkpoint with `{cls.__name__}.save_pretrained` or re-download it."
            )
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise OSError(f"Cannot read the weight index {index}: {err}. Re-download or re-save the checkpoint.") from err
        files = []
        for shard in shards:
            resolved = _resolve(path, shard, hub_kwargs)
            if resolved is None:
                raise OSError(f"{where} is missing the weight shard {shard} listed in {os.path.basename(index)}.")
            files.append(resolved)
    for file in files:
        check_safetensors_file(file)
    return files


def _is_safetensors_error(err: BaseException) -> bool:
    return any(t.__name__ == "SafetensorError" for t in type(err).__mro__)


class SafeCheckpointMixin:
    """Atomic ``save_pretrained`` and checked ``from_pretrained``; put it first in the bases,
    e.g. ``class MyPreTrainedModel(SafeCheckpointMixin, PreTrainedModel)``.

    On a tokenizer class only the atomic save applies (the loading checks are for models, which
    have a ``config_class`` and weights).
    """

    def save_pretrained(self, save_directory, *args, **kwargs):
        save = super().save_pretrained
        bound = inspect.signature(save).bind(save_directory, *args, **kwargs)
        arguments = bound.arguments
        path = os.fspath(save_directory)
        writes_here = arguments.get("is_main_process", True)
        if writes_here and hasattr(self, "should_save_on_this_rank"):
            writes_here = self.should_save_on_this_rank(writes_here)
        if os.path.isfile(path) or arguments.get("distributed_checkpoint") or not writes_here:
            # Nothing is written here (or every rank writes its own part): no swap.
            return save(*bound.args, **bound.kwargs)
        hub = None
        var_keyword = next((p.name for p in inspect.signature(save).parameters.values() if p.kind is p.VAR_KEYWORD), None)
        if arguments.get("push_to_hub"):
            if isinstance(self, PreTrainedModel):
                # Upload the finished checkpoint (extras included), not the library's half of it.
                arguments["push_to_hub"] = False
                hub = arguments.pop(var_keyword, {}) if var_keyword else {}
                hub.setdefault("repo_id", path.split(os.path.sep)[-1])
            elif var_keyword is not None:
                # The library names the repo after the directory it writes to: keep the user's name.
                arguments.setdefault(var_keyword, {}).setdefault("repo_id", path.split(os.path.sep)[-1])
        first = next(iter(inspect.signature(save).parameters))

        def write(tmp_dir: str):
            arguments[first] = tmp_dir
            result = save(*bound.args, **bound.kwargs)
            if hasattr(self, "_save_extras"):
                self._save_extras(tmp_dir)
            return result

        result = atomic_save(write, save_directory)
        if hub is not None:
            write_default_card(save_directory, getattr(self, "model_tags", None))
            upload_checkpoint(save_directory, **hub)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """Upload the model to the Hub as ``save_pretrained`` writes it — weights, config, code,
        tokenizer and the rendered model card (titled ``repo_id``) — with the arguments of
        `transformers`' ``push_to_hub``. Returns the commit info."""
        if not isinstance(self, PreTrainedModel):
            return super().push_to_hub(
                repo_id, commit_message=commit_message, commit_description=commit_description, private=private,
                token=token, revision=revision, create_pr=create_pr, max_shard_size=max_shard_size, tags=tags,
            )  # fmt: skip
        card_kwargs = getattr(self, "model_card_kwargs", None)
        with tempfile.TemporaryDirectory() as tmp_dir:
            if card_kwargs is not None:
                self.model_card_kwargs = {"repo_id": repo_id, **card_kwargs}
            try:
                self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            finally:
                if card_kwargs is not None:
                    self.model_card_kwargs = card_kwargs
            write_default_card(tmp_dir, [*(getattr(self, "model_tags", None) or []), *(tags or [])])
            return upload_checkpoint(
                tmp_dir, repo_id, commit_message=commit_message, commit_description=commit_description,
                private=private, token=token, revision=revision, create_pr=create_pr,
            )  # fmt: skip


    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if pretrained_model_name_or_path is None or not issubclass(cls, PreTrainedModel):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{cls.__name__} loads safetensors weights only; do not pass use_safetensors=False.")
        renames_given = "key_mapping" in kwargs
        files = check_checkpoint(cls, pretrained_model_name_or_path, kwargs)
        kwargs["use_safetensors"] = True
        if files and kwargs.get("force_download"):
            kwargs["force_download"] = False  # just downloaded afresh by the check: don't fetch twice
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as err:
            if not _is_safetensors_error(err):
                raise
            names = ", ".join(files) or os.fspath(pretrained_model_name_or_path)
            raise OSError(
                f"Cannot read the safetensors weights {names}: {err}. The file is corrupt: re-download it "
                "(e.g. `force_download=True`) or re-save the checkpoint."
            ) from err
        if "key_mapping" in kwargs and not renames_given:
            # Weights renamed from an older layout on loading are saved under today's names.
            model._weight_conversions = None
        return model


def upload_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create the Hub repo ``repo_id`` if needed and upload every file of ``folder`` to it in one
    commit (`huggingface_hub.create_repo` and `upload_folder`)."""
    repo_id = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message or "Upload model",
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def write_default_card(folder: str | os.PathLike, tags: list[str] | None = None) -> None:
    """Give a checkpoint that has no ``README.md`` (a model without a card of its own, such as a
    SentenceVAE) the minimal card `transformers` would upload, written locally."""
    path = os.path.join(folder, "README.md")
    if not os.path.exists(path):
        card_data = huggingface_hub.ModelCardData(library_name="transformers", tags=list(tags or []) or None)
        huggingface_hub.ModelCard.from_template(card_data).save(path)
