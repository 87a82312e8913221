package lru

import (
	"strconv"
	"testing"
)

func byLen(_ string, v []byte) int64 { return int64(len(v)) }

func TestSized_BoundInBytes(t *testing.T) {
	c := New[string, []byte](1000, 0, byLen)
	for i := 0; i < 100; i++ {
		c.Add(strconv.Itoa(i), make([]byte, 150))
		if c.Bytes() > 1000 {
			t.Fatalf("after %d adds: %d bytes", i+1, c.Bytes())
		}
	}
	if c.Len() != 6 {
		t.Fatalf("%d entries of 150 bytes in 1000", c.Len())
	}
	if _, ok := c.Get("99"); !ok {
		t.Fatal("the newest entry was evicted")
	}
	if _, ok := c.Get("0"); ok {
		t.Fatal("the oldest entry survived")
	}
}

func TestSized_ReplaceAndRemove(t *testing.T) {
	c := New[string, []byte](1000, 0, byLen)
	c.Add("a", make([]byte, 600))
	c.Add("a", make([]byte, 100))
	if c.Bytes() != 100 || c.Len() != 1 {
		t.Fatalf("after replace: %d bytes, %d entries", c.Bytes(), c.Len())
	}
	c.Add("a", make([]byte, 2000)) // too big: dropped, old value too
	if _, ok := c.Get("a"); ok || c.Bytes() != 0 {
		t.Fatalf("oversized value: kept=%v bytes=%d", ok, c.Bytes())
	}
	c.Add("b", make([]byte, 10))
	c.Remove("b")
	if c.Bytes() != 0 || c.Len() != 0 {
		t.Fatalf("after remove: %d bytes, %d entries", c.Bytes(), c.Len())
	}
}

func TestSized_CountBound(t *testing.T) {
	c := New[string, []byte](1<<20, 3, byLen)
	for i := 0; i < 10; i++ {
		c.Add(strconv.Itoa(i), []byte("x"))
	}
	if c.Len() != 3 || c.Bytes() != 3 {
		t.Fatalf("%d entries, %d bytes", c.Len(), c.Bytes())
	}
}

func TestSized_RemoveFunc(t *testing.T) {
	c := New[string, []byte](1000, 0, byLen)
	for _, k := range []string{"a/1", "a/2", "b/1"} {
		c.Add(k, []byte("xy"))
	}
	if n := c.RemoveFunc(func(k string) bool { return k[0] == 'a' }); n != 2 {
		t.Fatalf("removed %d, want 2", n)
	}
	if _, ok := c.Get("b/1"); !ok || c.Len() != 1 || c.Bytes() != 2 {
		t.Fatalf("after RemoveFunc: %d entries, %d bytes", c.Len(), c.Bytes())
	}
}
