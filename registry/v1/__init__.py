"""Generated gRPC stubs (tools/gen_protos.py); do not edit."""
