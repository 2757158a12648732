#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that adds latency, standing in for a store far away: each time the
conversation on a connection turns (the first bytes of a request after a response, of a
response after a request), those bytes wait DELAY_MS/2, so a request and its response cost
DELAY_MS more, while the rest of a message flows at full speed however the proxy is
scheduled. For benches only (no netem in this VM).

    benches/latency-proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS
"""
import asyncio
import sys



async def pipe(reader, writer, delay, turn, side):
    # `turn[0]` is the side that sent last on this connection: a gap within a message (a busy
    # proxy, a slow disk) is not a new round trip, a change of side is.
    try:
        while data := await reader.read(1 << 16):
            if turn[0] != side:
                turn[0] = side
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
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
        turn = [None]
        await asyncio.gather(
            pipe(client_r, server_w, half, turn, "client"),
            pipe(server_r, client_w, half, turn, "server"),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
