package tunnel

// withPlainProtocol makes an end behave as a peer that implements only the
// published grpctunnel.v1 protocol, with none of this package's extensions.
func withPlainProtocol() TunnelOption {
	return optionFunc(func(o *options) { o.plain = true })
}
