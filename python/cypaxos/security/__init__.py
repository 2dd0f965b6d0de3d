"""The trust boundary: who may talk to a replica (docs/security.md).

* `tls`: the TLS settings (`TLS`) and the `ssl` contexts of replicas and clients;
* `identity`: how a certificate names a replica or a client;
* `handshake`: the first frames of every connection, as sans-I/O state machines
  (cluster secret and client token challenge-response, TLS identities);
* `secrets`: cluster secret and token files;
* `certs`: ``cypaxos certs``, which writes a CA and certificates (`pki` builds them
  with `cryptography`, imported only there).
"""
from cypaxos.security.tls import TLS

__all__ = ["TLS"]
