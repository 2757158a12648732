#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that adds latency, standing in for a store far away: the first
bytes of each message (after the connection was quiet for a moment) wait DELAY_MS/2 in each
direction, so a request and its response cost DELAY_MS more, while bytes within a message flow
at full speed. For benches only (no netem in this VM).

    benches/latency-proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS
"""
import asyncio
import sys
import time

QUIET = 0.002  # seconds without bytes that end a message


async def pipe(reader, writer, delay):
    last = 0.0
    try:
        while data := await reader.read(1 << 16):
            now = time.monotonic()
            if now - last > QUIET:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
            last = time.monotonic()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(listen, upstream, delay_ms):
    half = delay_ms / 2000.0

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream)
        except ConnectionError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w, half), pipe(server_r, client_w, half))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
