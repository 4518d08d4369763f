"""The network shell: gRPC server and client (one error mapping), the wire codec, mDNS, interfaces and addresses."""
