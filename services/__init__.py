"""gRPC servicers, server bootstrap and the loraplex CLI."""
