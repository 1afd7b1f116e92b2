// probe is the only program in the test image of the local node (hack/local-node). Each
// subcommand exits 0 on success and non-zero with a one-line reason otherwise, so a pod's phase
// (Succeeded/Failed) is the test's answer.
//
//	probe serve ADDR DIR      serve the files under DIR over HTTP (GET /NAME) until killed
//	probe get URL [WANT]      GET URL, print the body; fail unless 200 (and the body contains WANT)
//	probe lookup NAME         resolve NAME with the pod's /etc/resolv.conf, print the addresses
//	probe kube PATH           GET PATH from the API server through the kubernetes Service, with
//	                          the pod's service account token and CA (fails unless 200)
//	probe cat FILE...         print files
//	probe sleep               block until killed
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: probe serve ADDR DIR | get URL [WANT] | lookup NAME | kube PATH | cat FILE... | sleep")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "serve":
		need(args, 2)
		srv := &http.Server{Addr: args[0], Handler: http.FileServer(http.Dir(args[1])),
			ReadHeaderTimeout: 5 * time.Second}
		go func() { waitSignal(); _ = srv.Close() }()
		if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
			fail("serve: %v", err)
		}
	case "get":
		need(args, 1)
		client := http.Client{Timeout: 10 * time.Second}
		resp, err := client.Get(args[0])
		if err != nil {
			fail("get %s: %v", args[0], err)
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		_ = resp.Body.Close()
		fmt.Printf("%s", body)
		if resp.StatusCode != http.StatusOK {
			fail("get %s: status %d", args[0], resp.StatusCode)
		}
		if len(args) > 1 && !strings.Contains(string(body), args[1]) {
			fail("get %s: body does not contain %q", args[0], args[1])
		}
	case "lookup":
		need(args, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		addrs, err := net.DefaultResolver.LookupHost(ctx, args[0])
		if err != nil {
			fail("lookup %s: %v", args[0], err)
		}
		fmt.Println(strings.Join(addrs, " "))
	case "kube":
		need(args, 1)
		const sa = "/var/run/secrets/kubernetes.io/serviceaccount/"
		token, err := os.ReadFile(sa + "token")
		if err != nil {
			fail("kube: %v", err)
		}
		ca, err := os.ReadFile(sa + "ca.crt")
		if err != nil {
			fail("kube: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			fail("kube: no certificate in %sca.crt", sa)
		}
		url := "https://" + net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")) + args[0]
		req, err := http.NewRequest(http.MethodGet, url, nil)
		if err != nil {
			fail("kube: %v", err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
		client := http.Client{Timeout: 10 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		resp, err := client.Do(req)
		if err != nil {
			fail("kube %s: %v", url, err)
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		_ = resp.Body.Close()
		fmt.Printf("%s\n", body)
		if resp.StatusCode != http.StatusOK {
			fail("kube %s: status %d", url, resp.StatusCode)
		}
	case "cat":
		need(args, 1)
		for _, f := range args {
			b, err := os.ReadFile(f)
			if err != nil {
				fail("cat: %v", err)
			}
			_, _ = os.Stdout.Write(b)
		}
	case "sleep":
		waitSignal()
	default:
		fail("unknown subcommand %q", os.Args[1])
	}
}

func need(args []string, n int) {
	if len(args) < n {
		fail("%s needs %d argument(s)", os.Args[1], n)
	}
}

func waitSignal() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "probe: "+format+"\n", a...)
	os.Exit(1)
}
