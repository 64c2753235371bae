# nbdfleece: an NBD server for incremental live backup, as a small container image.
#
#   docker build -t nbdfleece .
#   docker run -d --name nbdfleece -p 127.0.0.1:10809:10809 -v nbdfleece-data:/data nbdfleece
#   nbdinfo nbd://127.0.0.1/demo
#
# BASE_IMAGE is any Debian-like image with python3 (3.11 or later) and its venv module:
# python:3.11-slim-bookworm by default; tools/container.sh passes a local Debian 12 minbase
# image built with debootstrap where no registry serves base images. Podman: build with
# --format docker, or the OCI format drops HEALTHCHECK.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# A CA bundle for pip inside the build, for networks whose HTTPS goes through an
# intercepting proxy (tools/container.sh mounts the host's bundle and names it here).
# Empty: pip's own bundle.
ARG PIP_CERT=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# A venv works the same on both bases (no --break-system-packages on Debian's python3).
# The dependencies get their own layer, so a code change does not fetch numpy again.
COPY pyproject.toml /src/
RUN python3 -m venv /opt/nbdfleece \
    && /opt/nbdfleece/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /src/requirements.txt \
    && /opt/nbdfleece/bin/pip install -r /src/requirements.txt
COPY README.md /src/
COPY nbdfleece/ /src/nbdfleece/
COPY tools/nbdfleece_backup/ /src/tools/nbdfleece_backup/
RUN /opt/nbdfleece/bin/pip install --no-deps /src \
    && /opt/nbdfleece/bin/pip uninstall -y -q pip setuptools \
    && find /opt/nbdfleece -depth -type d -name tests -path '*/numpy/*' -exec rm -rf {} +

FROM ${BASE_IMAGE}
ENV PATH=/opt/nbdfleece/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NBDFLEECE_DATA=/data
COPY --from=build /opt/nbdfleece /opt/nbdfleece
# The data folder belongs to the server's user before VOLUME, so a new named volume
# starts with that owner.
RUN groupadd --gid 10809 nbdfleece \
    && useradd --no-log-init --uid 10809 --gid nbdfleece --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin nbdfleece \
    && mkdir -p /data && chown nbdfleece:nbdfleece /data && chmod 0750 /data \
    && nbdfleece --version

USER 10809:10809
WORKDIR /data
VOLUME ["/data"]
EXPOSE 10809

# A real NBD handshake (greeting, NBD_OPT_LIST, NBD_OPT_ABORT), not just a TCP connect.
# A server moved to another port needs --health-cmd 'nbdfleece probe 127.0.0.1:PORT'.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["nbdfleece", "probe", "--timeout", "5"]

# SIGTERM is a graceful stop: stop accepting, finish in-flight requests, flush, save
# persistent bitmaps, exit 0. The server is PID 1 and handles the signal itself.
STOPSIGNAL SIGTERM
ENTRYPOINT ["nbdfleece", "serve"]
# The embedded default (demo disk and QMP monitor in /data), but reachable from outside the
# container: 0.0.0.0 inside it, so plaintext NBD on a non-loopback address must be allowed
# (publish the port on 127.0.0.1, or use --tls). Arguments after the image name replace
# this whole list.
CMD ["--listen", "0.0.0.0:10809", "--allow-plaintext-network", \
     "--export", "demo=/data/demo.raw,create=1G,description=nbdfleece demo disk", \
     "--qmp", "unix:/data/qmp.sock"]
