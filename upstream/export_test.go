package upstream

// tokenCount is how many scopes have a token in the cache.
func (a *authenticator) tokenCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.tokens.Len()
}
