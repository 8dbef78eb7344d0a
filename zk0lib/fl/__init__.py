"""The Flower side of zk0: the ClientApp and ServerApp, their transport and strategies, and the engines
that run them (simulation, Deployment Engine)."""
