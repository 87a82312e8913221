package e2e

import (
	"path/filepath"
	"testing"
)

// cosignEnv keeps cosign on loopback: no public Sigstore service is ever
// reached, and an empty password opens the test's key.
func cosignEnv(dir string) []string {
	return []string{"COSIGN_PASSWORD=", "HTTPS_PROXY=http://127.0.0.1:9", "HTTP_PROXY=http://127.0.0.1:9",
		"NO_PROXY=127.0.0.1,localhost", "HOME=" + dir, "TUF_ROOT=" + filepath.Join(dir, "tuf"), "COSIGN_EXPERIMENTAL=0"}
}

// cosignKeys makes a key pair and a signing config with no public
// services, in dir.
func cosignKeys(t *testing.T, dir string) (key, pub, sc string) {
	t.Helper()
	cosign := tool(t, "cosign")
	runIn(t, dir, cosignEnv(dir), cosign, "generate-key-pair")
	runIn(t, dir, cosignEnv(dir), cosign, "signing-config", "create", "--out", "sc.json")
	return filepath.Join(dir, "cosign.key"), filepath.Join(dir, "cosign.pub"), filepath.Join(dir, "sc.json")
}

// cosignSign signs ref (by digest) with the key.
func cosignSign(t *testing.T, dir, key, sc, ref string) {
	t.Helper()
	runIn(t, dir, cosignEnv(dir), tool(t, "cosign"), "sign", "--key", key, "--signing-config", sc,
		"--allow-http-registry", "--allow-insecure-registry", "-y", ref)
}

// cosignVerify verifies ref's signature with the public key.
func cosignVerify(t *testing.T, dir, pub, ref string) (string, error) {
	t.Helper()
	return runErr(dir, cosignEnv(dir), tool(t, "cosign"), "verify", "--key", pub, "--insecure-ignore-tlog=true",
		"--allow-http-registry", "--allow-insecure-registry", ref)
}

// TestE2E_Cosign_VerifyThroughMirror: an image signed with cosign v3 on
// distribution (the signature is a Sigstore bundle referrer under the
// fallback tag) verifies through ocimirror, and keeps verifying with the
// upstream stopped; an image signed by another key does not.
func TestE2E_Cosign_VerifyThroughMirror(t *testing.T) {
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	dir := t.TempDir()
	key, pub, sc := cosignKeys(t, dir)
	d := s.digests["e2e/app:multi-oci"]
	cosignSign(t, dir, key, sc, up.host+"/e2e/app@"+d)
	om := startMirror(t, mirrorConfig("up.test", up.host, ""))
	via := om.host + "/e2e/app@" + d
	if out, err := cosignVerify(t, dir, pub, via); err != nil {
		t.Fatalf("cosign verify through ocimirror: %v\n%s", err, out)
	}
	up.stop()
	if out, err := cosignVerify(t, dir, pub, via); err != nil {
		t.Fatalf("cosign verify through ocimirror, upstream stopped: %v\n%s", err, out)
	}
	other := t.TempDir()
	_, otherPub, _ := cosignKeys(t, other)
	if out, err := cosignVerify(t, dir, otherPub, via); err == nil {
		t.Fatalf("verified with another key:\n%s", out)
	}
}
