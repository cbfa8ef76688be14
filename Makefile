# `make demo` and `make test` set up everything they need on a fresh Debian 12
# machine (as root), and do nothing when it is already there.

VENV         := .venv
PY           := $(VENV)/bin/python
STRATA       := $(VENV)/bin/strata
# Debian's python3: other users can run it (pyenv's under /root they cannot)
SYSTEM_PY    := /usr/bin/python3
# fuse-overlayfs, unionfs-fuse, bubblewrap: the peers benchmarks/ runs beside strata
# libseccomp2: the syscall filter (pyseccomp binds it); gcc and libc6-dev: the tests'
# static probe (tests/probe.c) that tries the calls a container must not make, and with
# libfuse3-dev and python3-dev the fallocate and passthrough shim (unionfs/_fuseshim.c, built by pip);
# debootstrap: the Debian 12 image of the real-workload tests (tests/debian.py);
# skopeo and umoci: the tools that check what strata save writes and make what load reads;
# docker-registry: the CNCF registry the push/pull tests start on 127.0.0.1 (tests/registry.py;
# never its packaged service, which policy-rc.d keeps from starting on these machines);
# passt: pasta, the user-mode network stack of --network bridge (runner/network.py);
# buildah: builds the strata build tests' Dockerfiles too, to compare the trees (and its benchmark)
APT_PACKAGES := fuse3 libfuse3-dev pkg-config libcap-dev busybox-static \
                python3 python3-venv python3-dev gcc libc6-dev zstd libseccomp2 \
                uidmap util-linux debootstrap \
                fuse-overlayfs unionfs-fuse bubblewrap \
                skopeo umoci docker-registry \
                containerd podman tini passt \
                buildah
STAMP        := $(VENV)/.installed

.PHONY: all deps bytecode system-packages demo test clean

all: test

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml setup.py unionfs/_fuseshim.c | system-packages
	test -x $(PY) || $(SYSTEM_PY) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# Byte-compile the checkout as pip does site-packages: with PYTHONDONTWRITEBYTECODE
# set (as on these machines) every strata command would otherwise compile its
# modules from source, ~60 ms of each supervisor's start. Stale files are only
# rewritten, so this is cheap when nothing changed.
bytecode: $(STAMP)
	$(PY) -m compileall -q runner store unionfs

deps: system-packages $(STAMP) bytecode

demo: deps
	STRATA=$(STRATA) sh runner/demo.sh

test: deps
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis build unionfs/*.so
