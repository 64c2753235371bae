# nbdfleece: an NBD server for incremental live backup.
#
#   docker build -t nbdfleece .
#   docker run -d -p 127.0.0.1:10809:10809 -v nbdfleece-data:/data nbdfleece
#   nbdinfo nbd://127.0.0.1/demo
#
# Arguments after the image name replace CMD: keep "--listen 0.0.0.0:10809"
# (see README.md, "Docker").
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NBDFLEECE_DATA=/data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY nbdfleece/ nbdfleece/
RUN pip install --no-cache-dir . \
    && cd / && rm -rf /src \
    && groupadd --system --gid 10809 nbdfleece \
    && useradd --system --uid 10809 --gid nbdfleece --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin nbdfleece \
    && mkdir -p /data && chown nbdfleece:nbdfleece /data

USER nbdfleece
WORKDIR /data
VOLUME /data
EXPOSE 10809

# A real NBD handshake, stdlib only: read the 18-byte greeting, send client
# flags 3 (FIXED_NEWSTYLE | NO_ZEROES) and NBD_OPT_ABORT, expect its 20-byte ACK.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import socket,struct,sys;s=socket.create_connection(('127.0.0.1',10809),5);s.settimeout(5);f=s.makefile('rb');g=f.read(18);s.sendall(struct.pack('>IQII',3,0x49484156454F5054,2,0));a=f.read(20);sys.exit(0 if g[:16]==b'NBDMAGICIHAVEOPT' and a==struct.pack('>QIII',0x3E889045565A9,2,1,0) else 1)"]

# The server stops gracefully on SIGTERM: stops accepting, lets in-flight
# requests finish, flushes, exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["nbdfleece", "serve"]
CMD ["--listen", "0.0.0.0:10809", "--export", "demo=/data/demo.raw,create=1G"]
