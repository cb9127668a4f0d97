from relay.client.endpoints import RelayTLSClientParser

relayTLSClient = RelayTLSClientParser()
