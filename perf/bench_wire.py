"""Wire codec throughput: frames and client batches encoded and decoded, in one process.

No sockets: each benchmark encodes what a sender writes and decodes it the way the
receiver does (FrameDecoder + the parse_* check), so it measures the Python/CBOR cost a
replica or a client pays per frame or per batch.  pyperf's loop count counts the unit
in the benchmark's name (an ACCEPT frame, a client batch, a reply...), so each value
is the time to encode *and* decode one of them.

    python perf/bench_wire.py -o wire.json        # add --fast for a quick look
    python -m pyperf compare_to old.json wire.json

Benchmarks:

* ``accept_frame_1x64B`` / ``accept_frame_1024x64B``: a peer ACCEPT message carrying
  1 or 1024 slot values of 64 bytes (encode_frame, FrameDecoder, parse_peer_message);
* ``client_batch_pack_unpack_1`` / ``_64`` / ``_1024``: the client's put commands
  (encode_put) packed into one client batch and unpacked again (cypaxos.commands);
* ``submit_request_1024``: the whole client write path of one batch of 1024 puts:
  encode_put x1024, pack_client_batch, the ["submit", id, batch] frame, and on the
  replica's side FrameDecoder + parse_client_request;
* ``submit_reply_1024``: the reply path of that batch: 1024 packed results in an
  ["ok", id, results] frame, decoded by the client (FrameDecoder, parse_reply,
  unpack_results).
"""
import time

import pyperf

from cypaxos import commands, wire

VALUE = bytes(range(64))
KEY = b"k%015d" % 12345        # 16 bytes, like cypaxos bench
CLUSTER = frozenset({1, 2, 3})


def accept_frame(values):
    """ACCEPT from replica 1 to replica 2 with `values` 64-byte values."""
    msg = (wire.ACCEPT, 1, (7 << 16) | 1, 1000, [VALUE] * values, 999)

    def run(loops):
        encode = wire.encode_frame
        parse = wire.parse_peer_message
        decoder = wire.FrameDecoder()
        started = time.perf_counter()
        for _ in range(loops):
            decoder.feed(encode(msg))
            parse(decoder.next_frame(), CLUSTER, 2, 1)
        return time.perf_counter() - started
    return run


def client_batch(count):
    """pack_client_batch of `count` puts, then unpack_client_batch."""
    cmds = [commands.encode_put(KEY, VALUE)] * count

    def run(loops):
        pack = commands.pack_client_batch
        unpack = commands.unpack_client_batch
        started = time.perf_counter()
        for i in range(loops):
            unpack(pack(77, 1 + i * count, i * count, cmds))
        return time.perf_counter() - started
    return run


def submit_request(count):
    """Client side: encode count puts, pack, frame; replica side: decode and check."""
    def run(loops):
        put = commands.encode_put
        pack = commands.pack_client_batch
        encode = wire.encode_frame
        decoder = wire.FrameDecoder()
        started = time.perf_counter()
        for i in range(loops):
            batch = pack(77, 1 + i * count, i * count, [put(KEY, VALUE) for _ in range(count)])
            decoder.feed(encode(wire.submit_request(i, batch)))
            wire.parse_client_request(decoder.next_frame())
        return time.perf_counter() - started
    return run


def submit_reply(count):
    """Replica side: the packed results frame; client side: decode and unpack."""
    packed = commands.pack_results([(commands.RESULT_OK, b"")] * count)

    def run(loops):
        encode = wire.encode_frame
        unpack = commands.unpack_results
        decoder = wire.FrameDecoder()
        started = time.perf_counter()
        for i in range(loops):
            decoder.feed(encode(wire.ok(i, packed)))
            reply = wire.parse_reply(decoder.next_frame())
            unpack(reply[2])
        return time.perf_counter() - started
    return run


def main():
    runner = pyperf.Runner()
    runner.metadata["description"] = __doc__.splitlines()[0]
    runner.metadata["cbor_accelerated"] = str(wire.CBOR_ACCELERATED)
    runner.bench_time_func("accept_frame_1x64B", accept_frame(1))
    runner.bench_time_func("accept_frame_1024x64B", accept_frame(1024))
    for count in (1, 64, 1024):
        runner.bench_time_func(f"client_batch_pack_unpack_{count}", client_batch(count))
    runner.bench_time_func("submit_request_1024", submit_request(1024))
    runner.bench_time_func("submit_reply_1024", submit_reply(1024))


if __name__ == "__main__":
    main()
