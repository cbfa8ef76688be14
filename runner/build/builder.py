"""Running a planned Dockerfile (runner.build.plan): each step an image in the store.

- RUN runs in a real strata container on the step's parent image; COPY, ADD and a
  WORKDIR that must be made write into a container that never runs
  (runner.build.copying). The step's layer is that container's journal diff,
  made as `strata commit` makes it: O(changes), never a walk of the image.
- The other instructions change only the config: an image with no new layer
  (an empty_layer history entry), as Docker's builder makes.
- The cache, like BuildKit's: a step's key is its parent's key, the instruction
  and what it runs with (args, env, user, workdir, shell), and for COPY and ADD
  a digest of the sources' contents and metadata (mtimes left out). The key
  names the step's image in cache/build/<key> of the store, so the cache is the
  store's intermediate images, survives across builds, and goes with them
  (rmi): an entry whose image is gone is a miss.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import posixpath
import sys
import time

from store import Store, StoreError
from store.fsutil import write_atomic
from store.store import canonical_json, new_image_config, now_rfc3339

from .context import ContextTree, expand_sources, resolve_in, sources_digest
from .plan import Stage, Step

SCRATCH_CREATED = "1970-01-01T00:00:00Z"  # the empty image is a constant: one id in every store


class BuildFailed(StoreError):
    pass


def step_key(parent_key: str, material: dict) -> str:
    return hashlib.sha256(canonical_json({"parent": parent_key, **material})).hexdigest()


class Cache:
    """cache/build/<key> -> the image id of that step's result."""

    def __init__(self, store: Store):
        self.store = store
        self.dir = os.path.join(store.root, "cache", "build")
        # every image a build made, by id (a --no-cache build's replace older ones in `dir`)
        self.made_dir = os.path.join(store.root, "cache", "build-images")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(self.made_dir, mode=0o700, exist_ok=True)

    def get(self, key: str) -> str | None:
        try:
            with open(os.path.join(self.dir, key), "rb") as f:
                image_id = f.read().decode().strip()
        except FileNotFoundError:
            return None
        return image_id if self.store.image_exists(image_id) else None

    def put(self, key: str, image_id: str) -> None:
        write_atomic(os.path.join(self.dir, key), image_id.encode())

    def made(self, image_id: str) -> None:
        write_atomic(os.path.join(self.made_dir, image_id.removeprefix("sha256:")), b"")

    def made_images(self) -> set[str]:
        return {"sha256:" + n for n in os.listdir(self.made_dir) if not n.startswith(".")}

    def entries(self) -> dict[str, str]:
        """key -> image id, the stale ones too."""
        out = {}
        for key in os.listdir(self.dir):
            if not key.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    with open(os.path.join(self.dir, key), "rb") as f:
                        out[key] = f.read().decode().strip()
        return out

    def forget(self, key: str | None = None, image_id: str | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            if key is not None:
                os.unlink(os.path.join(self.dir, key))
            if image_id is not None:
                os.unlink(os.path.join(self.made_dir, image_id.removeprefix("sha256:")))


def prune_cache(store: Store) -> list[str]:
    """Remove the build cache: the images builds made that no tag, container or other
    image needs, from the leaves down (a chain of intermediates goes whole); then the
    cache entries whose images are gone. Returns the removed images' ids."""
    cache = Cache(store)
    made = cache.made_images()
    removed = []
    while True:
        tags = set(store.read_tags().values())
        leaves = [i for i in store.image_ids() if i in made and i not in tags and not store.children_of(i)
                  and not store.containers_using(i)]
        if not leaves:
            break
        for image_id in leaves:
            store.remove_image(image_id)
            removed.append(image_id)
    for key, image_id in cache.entries().items():
        if not store.image_exists(image_id):
            cache.forget(key=key)
    for image_id in made:
        if not store.image_exists(image_id):
            cache.forget(image_id=image_id)
    return removed


class Progress:
    """BuildKit's plain progress on stderr: `#N [stage i/n] INSTRUCTION`, then
    `#N CACHED` or `#N DONE 0.1s`; nothing with -q."""

    def __init__(self, quiet: bool):
        self.quiet, self.number = quiet, 0
        self.out = open(os.devnull, "w") if quiet else sys.stderr

    def begin(self, text: str) -> int:
        self.number += 1
        self.say(self.number, text)
        return self.number

    def say(self, number: int, text: str) -> None:
        self.out.write(f"#{number} {text}\n")
        self.out.flush()


@contextlib.contextmanager
def output_to(fd: int | None):
    """The container's stdout goes where the progress goes (stderr), or nowhere (-q):
    strata build's stdout is the image id alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    target = os.open(os.devnull, os.O_WRONLY) if fd is None else fd
    os.dup2(target, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        if fd is None:
            os.close(target)


class CreateArgs(argparse.ArgumentParser):
    def error(self, message: str):
        raise StoreError(f"build container: {message}")


class Builder:
    def __init__(self, store: Store, context: str, no_cache: bool, keep_containers: bool, quiet: bool):
        self.store = store
        self.context = ContextTree(context)
        self.no_cache, self.keep_containers = no_cache, keep_containers
        self.cache = Cache(store)
        self.progress = Progress(quiet)
        self.built: dict[int, tuple[str, str]] = {}  # stage index -> (image id, key)

    def close(self) -> None:
        self.context.close()
        if self.progress.quiet:
            self.progress.out.close()

    # -- stages --------------------------------------------------------------

    def build(self, stages: list[Stage], many: bool) -> str:
        self.check_sources(stages)
        image_id = ""
        for stage in stages:
            image_id = self.build_stage(stage, many)
        return image_id

    def check_sources(self, stages: list[Stage]) -> None:
        """COPY and ADD sources in the context exist, before any step runs."""
        for stage in stages:
            for step in stage.steps:
                if step.kind == "copy" and step.copy.get("from") is None:
                    for source in step.copy["sources"]:
                        try:
                            expand_sources(self.context, source)
                        except StoreError as e:
                            raise BuildFailed(f"Dockerfile:{step.line}: {step.instruction.split()[0]}: {e}") from None

    def base_of(self, stage: Stage) -> str:
        if stage.base_kind == "stage":
            return self.built[int(stage.base)][0]
        if stage.base_kind == "scratch":
            return self.scratch_image()
        return stage.base

    def build_stage(self, stage: Stage, many: bool) -> str:
        label = stage.label(many)
        total = len(stage.steps) + 1
        prefix = f"[{label} " if label else "["
        image_id = self.base_of(stage)
        number = self.progress.begin(f"{prefix}1/{total}] FROM {stage.from_text}")
        key = step_key("", {"from": image_id})
        # CACHED once an earlier build started from this image, as BuildKit reports a resolved base
        self.progress.say(number, "CACHED" if self.cache.get(key) == image_id and not self.no_cache else "DONE 0.0s")
        self.cache.put(key, image_id)
        for position, step in enumerate(stage.steps, 2):
            number = self.progress.begin(f"{prefix}{position}/{total}] {step.instruction}")
            started = time.monotonic()
            try:
                material = dict(step.key)
                if step.kind == "copy":
                    material["sources"] = self.copy_digest(step)
                key = step_key(key, material)
                hit = None if self.no_cache else self.cache.get(key)
                if hit is not None and self.store.image_parent(hit) == image_id:
                    self.progress.say(number, "CACHED")
                    image_id = hit
                    continue
                image_id = self.run_step(stage, step, image_id, number)
            except BuildFailed:
                raise
            except StoreError as e:  # (the copier's, a container's that would not start): the line says which step
                raise BuildFailed(f"Dockerfile:{step.line}: {e}") from None
            self.cache.made(image_id)
            self.cache.put(key, image_id)
            self.progress.say(number, f"DONE {time.monotonic() - started:.1f}s")
        self.built[stage.index] = (image_id, key)
        return image_id

    def scratch_image(self) -> str:
        config = new_image_config([], [], {}, SCRATCH_CREATED)
        with self.store.staging() as staging:
            return self.store.create_image(config, None, [], staging)

    # -- steps ---------------------------------------------------------------

    def run_step(self, stage: Stage, step: Step, parent_id: str, number: int) -> str:
        if step.kind == "run":
            container = self.new_container(parent_id, step.argv, step.env, step.config)
            try:
                self.run_container(container, step)
                return self.commit(stage, step, parent_id, container, number)
            finally:
                self.done_with(container, number)
        if step.kind == "copy" or (step.kind == "workdir" and not self.is_dir_in(parent_id, step.config["WorkingDir"])):
            container = self.new_container(parent_id, ["/bin/sh"], [], step.config)
            try:
                self.copy_in(step, parent_id, container)
                return self.commit(stage, step, parent_id, container, number)
            finally:
                self.done_with(container, number)
        return self.new_image(stage, step, parent_id, None, {})

    def copy_in(self, step: Step, parent_id: str, container: dict) -> None:
        """COPY's or ADD's sources (or WORKDIR's directory) into the step's container."""
        from . import copying
        image_tree = self.image_tree(parent_id)
        tree = None
        try:
            if step.kind == "workdir":
                copying.make_dir(self.store, container, image_tree, step.config["WorkingDir"],
                                 step.config.get("User") or "")
                return
            tree = self.copy_source(step)
            copying.copy_into(self.store, container, tree, image_tree, step.copy, step.config.get("WorkingDir") or "/")
        finally:
            image_tree.close()
            if tree is not None and tree is not self.context:
                tree.close()

    def image_tree(self, image_id: str):
        from unionfs.diff import ImageTree
        from unionfs.storeview import image_lower
        return ImageTree(image_lower(self.store, image_id, point_lookups=True))

    def is_dir_in(self, image_id: str, path: str) -> bool:
        from .copying import is_dir_in
        tree = self.image_tree(image_id)
        try:
            return is_dir_in(tree, path)
        finally:
            tree.close()

    def copy_source(self, step: Step):
        """The tree COPY reads: the context, or an earlier stage's or an image's."""
        source = step.copy.get("from")
        if source is None:
            return self.context
        return self.image_tree(self.built[source[1]][0] if source[0] == "stage" else source[1])

    def copy_digest(self, step: Step) -> str:
        tree = self.copy_source(step)
        try:
            paths = [resolve_in(tree, p) for s in step.copy["sources"] for p in expand_sources(tree, s)]
            digest = sources_digest(tree, paths)
            kind = "multi"
            if len(paths) == 1:
                st = tree.stat(paths[0])
                kind = "dir" if st is not None and st.is_dir() else "file"
        finally:
            if tree is not self.context:
                tree.close()
        verb = "ADD" if step.copy["add"] else "COPY"
        source = step.copy.get("from")
        origin = f"--from={source[2]} " if source else ""
        dest = posixpath.join(step.config.get("WorkingDir") or "/", step.copy["dest"])
        step.created_by = f"{verb} {origin}{kind}:{digest} in {dest}"
        return digest

    # -- containers ------------------------------------------------------------

    def new_container(self, image_id: str, argv: list[str], env: list[str], config: dict) -> dict:
        from store.containers import update_config
        from .. import lifecycle
        from ..containers_cli import add_create_flags
        parser = CreateArgs(prog="strata build", add_help=False)
        add_create_flags(parser)
        words = ["--name", f"strata-build-{os.urandom(5).hex()}", "--network", "host"]
        for entry in env:
            words += ["-e", entry]
        if config.get("WorkingDir"):
            words += ["-w", config["WorkingDir"]]
        if config.get("User"):
            words += ["-u", config["User"]]
        created = lifecycle.create(self.store, parser.parse_args(words + [image_id] + argv))
        # the step's own command: RUN never goes through the image's ENTRYPOINT; and no
        # volumes for the image's VOLUMEs: what a step writes there is kept, as BuildKit keeps it
        config = update_config(self.store, created["Id"], {"Cmd": list(argv), "Mounts": []})
        if created.get("Mounts"):
            from store.volumes import remove_anonymous_volumes
            from ..mounts import remove_mapped
            remove_anonymous_volumes(self.store, created, remove_mapped)
        return config

    def run_container(self, container: dict, step: Step) -> None:
        from .. import lifecycle
        from ..containers_cli import attach_and_wait
        with output_to(None if self.progress.quiet else 2):
            lifecycle.start(self.store, container, wait_attach=True)
            code = attach_and_wait(self.store, container, False, b"")
        if code != 0:
            raise BuildFailed(f"Dockerfile:{step.line}: process \"{' '.join(step.argv)}\" did not complete "
                              f"successfully: exit code: {code}")

    def done_with(self, container: dict, number: int) -> None:
        from .. import lifecycle
        if self.keep_containers:
            self.progress.say(number, f"kept build container {container['Name']}")
            return
        lifecycle.remove(self.store, container, force=True)

    # -- images ----------------------------------------------------------------

    def commit(self, stage: Stage, step: Step, parent_id: str, container: dict, number: int) -> str:
        """The container's journal diff as the step's layer (as `strata commit` makes it)."""
        from unionfs.commit import fill_layer
        from unionfs.storeview import while_steady
        from ..changes_cli import open_changes
        started = time.monotonic()
        with self.store.staging() as staging:
            changes = open_changes(self.store, container)
            try:
                found = while_steady(changes, lambda c: c.diff())
                layer = self.store.prepare_layer(staging, lambda w: fill_layer(
                    w, changes.before, changes.after, found, changes.hidden))
            finally:
                changes.close()
            image_id = self.new_image(stage, step, parent_id, layer, {"container": container["Id"]}, staging)
        self.progress.say(number, f"layer {layer.diff_id} ({len(found)} changes) "
                                  f"{time.monotonic() - started:.3f}s")
        return image_id

    def new_image(self, stage: Stage, step: Step, parent_id: str, layer, provenance: dict,
                  staging: str | None = None) -> str:
        if staging is None:
            with self.store.staging() as staging:
                return self.new_image(stage, step, parent_id, layer, provenance, staging)
        parent = self.store.image_config(parent_id)
        created = now_rfc3339()
        entry = {"created": created, "created_by": step.created_by or step.instruction}
        if layer is None:
            entry["empty_layer"] = True
        if provenance:
            entry["provenance"] = provenance
        diff_ids = parent["rootfs"]["diff_ids"] + ([layer.diff_id] if layer is not None else [])
        config = new_image_config(diff_ids, parent.get("history", []) + [entry], step.config, created,
                                  stage.author or parent.get("author", ""))
        return self.store.create_image(config, parent_id, [layer] if layer is not None else [], staging)
