from relay.server.tls import RelayTLSServerParser

relayTLSServer = RelayTLSServerParser()
