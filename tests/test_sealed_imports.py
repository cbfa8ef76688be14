"""runner.sealed_imports: a process that entered a container's root loads no module from it
(runner/sealed_imports.py has the finding that made it)."""
import os
import sys
import tempfile



def test_a_sealed_process_imports_nothing_from_the_root_it_entered():
    """A root that plants a module and a codec where the host's sys.path and encodings
    package point: after seal() and chroot, neither `import` nor a codec lookup runs them,
    while what was loaded before goes on working. (Unsealed, the same child runs both:
    the control.)"""
    assert os.geteuid() == 0, "chroot needs root: run the suite as root"
    import codecs  # noqa: F401
    import json  # noqa: F401  (loaded before: still there after)
    root = tempfile.mkdtemp(prefix="strata-sealed-", dir="/var/tmp")
    try:
        encodings_dir = os.path.dirname(__import__("encodings").__file__)
        for directory in {*filter(None, sys.path), encodings_dir}:
            os.makedirs(root + directory, exist_ok=True)
            name = "plantedcodec" if directory == encodings_dir else "planted"
            with open(os.path.join(root + directory, name + ".py"), "w") as f:
                f.write("import os\nos.write(1, b'RAN ')\n")
        results = {}
        for sealed in (False, True):
            read_end, write_end = os.pipe()
            child = os.fork()
            if child == 0:
                os.dup2(write_end, 1)
                if sealed:
                    from runner import sealed_imports
                    sealed_imports.seal()
                os.chroot(root)
                for attempt in (lambda: __import__("planted"), lambda: codecs.lookup("plantedcodec")):
                    try:
                        attempt()
                        os.write(1, b"imported ")
                    except (ImportError, LookupError):
                        os.write(1, b"refused ")
                os.write(1, json.dumps([1]).encode())
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as f:
                results[sealed] = f.read().decode()
            os.waitpid(child, 0)
        assert results[False].startswith("RAN ")  # the control: unsealed, the planted code runs
        assert results[True] == "refused refused [1]", results
    finally:
        import shutil
        shutil.rmtree(root)
